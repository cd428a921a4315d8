"""pytest plugin of the GPU session (`-p _pytest_fixed_tiles`, benchmarks/ on sys.path): the attention kernels run
with fixed tiles instead of autotuning, so that the correctness tests compile each kernel once per signature
instead of once per candidate configuration (minutes on a fresh machine). The tiles are those the kernels' module
keeps for 3xTF32 at the widest head dims (`_TF32X3_WIDE`: no register spills, so no minute-long fp32 compiles), and
fit fp16 and bf16 at every head dim. Tests that set their own tiles (monkeypatch) still do."""

FIXED_BLOCKS = {"fwd": (32, 32), "dkdv": (16, 64), "dq": (32, 32)}


def pytest_configure(config):
    from mmfuse_fast.kernels import modality_attention as kernels

    kernels.FORCE_BLOCKS = dict(FIXED_BLOCKS)
    print(f"fixed attention tiles (no autotuning): {FIXED_BLOCKS}")
