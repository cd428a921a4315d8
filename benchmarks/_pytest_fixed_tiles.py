"""pytest plugin of the GPU session (`-p _pytest_fixed_tiles`, benchmarks/ on sys.path): the attention kernels run
with fixed tiles instead of autotuning, so that the correctness tests compile each kernel once per signature
instead of once per candidate configuration (minutes on a fresh machine). The tiles fit every head dim the tests use
(16-128) in fp32, fp16 and bf16 on sm_80 and sm_90. Tests that set their own tiles (monkeypatch) still do."""

FIXED_BLOCKS = {"fwd": (64, 64), "dkdv": (32, 64), "dq": (64, 32)}


def pytest_configure(config):
    from mmfuse_fast.kernels import modality_attention as kernels

    kernels.FORCE_BLOCKS = dict(FIXED_BLOCKS)
    print(f"fixed attention tiles (no autotuning): {FIXED_BLOCKS}")
