"""Triton backend of `modality_attention` against the reference (contract: docs/architecture.md, "Ops and kernels";
tolerances: docs/method.md, "Conventions").

On a CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is
imported): fp32 and fp16, tiny shapes. bf16, the model path, CUDA graphs and timings are GPU-only (`@pytest.mark.gpu`).
"""

import os
import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from mmfuse_fast.ops import _backend, modality_attention  # noqa: E402
from mmfuse_fast.ops.reference import modality_attention_reference, used_token_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from mmfuse_fast.kernels import modality_attention as kmod  # noqa: E402


def _allow(pattern, nq, nk):
    if pattern == "all":
        return None
    if pattern == "all_explicit":
        return torch.ones(nq, nk, dtype=torch.bool, device=DEVICE)
    if pattern == "~eye":
        return ~torch.eye(nq, nk, dtype=torch.bool, device=DEVICE)
    if pattern == "row_false":  # ~eye, with the last query set seeing nothing at all
        allow = ~torch.eye(nq, nk, dtype=torch.bool, device=DEVICE) if nq > 1 else torch.ones(nq, nk, dtype=torch.bool,
                                                                                             device=DEVICE)
        allow[-1] = False
        return allow
    raise ValueError(pattern)


def _used(segments, batch, gen):
    """Random used counts in [0, capacity], the first sample at full capacity."""
    caps = torch.tensor(segments, dtype=torch.int64)
    used = (torch.rand(batch, len(segments), generator=gen) * (caps + 1).float()).long().clamp(max=caps)
    used[0] = caps
    return used.to(torch.int32).to(DEVICE)


def _inputs(batch, heads, q_segments, kv_segments, d, dtype, gen, layout="contiguous"):
    lq, lk = sum(q_segments), sum(kv_segments)
    if layout == "model":  # (B, L, 3, H, D) projection output permuted to (B, H, L, D): strided views
        assert lq == lk
        qkv = torch.randn(batch, lq, 3, heads, d, generator=gen).to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        assert not q.is_contiguous()
    else:
        q = torch.randn(batch, heads, lq, d, generator=gen).to(DEVICE, dtype)
        k = torch.randn(batch, heads, lk, d, generator=gen).to(DEVICE, dtype)
        v = torch.randn(batch, heads, lk, d, generator=gen).to(DEVICE, dtype)
    do = torch.randn(batch, heads, lq, d, generator=gen).to(DEVICE, dtype)
    return q, k, v, do


def _run(backend, q, k, v, do, qs, ks, allow, q_used, kv_used, scale=None):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = modality_attention(q, k, v, qs, ks, allow, q_used, kv_used, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do) if out.numel() else (q * 0, k * 0, v * 0)
    return (out.detach(), *grads)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _compare(q, k, v, do, qs, ks, allow, q_used, kv_used, scale=None):
    """Forward and the three gradients of the Triton backend vs the reference; the low-precision tolerance rule of
    docs/method.md ("Conventions")."""
    got = _run("triton", q, k, v, do, qs, ks, allow, q_used, kv_used, scale)
    exact = _run("reference", *(t.double() for t in (q, k, v, do)), qs, ks, allow, q_used, kv_used, scale)
    names = ("out", "dq", "dk", "dv")
    if q.dtype == torch.float32:
        for name, a, b in zip(names, got, exact):
            assert a.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    else:  # low precision: error vs an exact reference <= 2x the error of the same-dtype PyTorch reference
        same = _run("reference", q, k, v, do, qs, ks, allow, q_used, kv_used, scale)
        for name, a, b, c in zip(names, got, exact, same):
            assert a.dtype == q.dtype and a.shape == b.shape
            err, ref_err = _max_err(a, b), _max_err(c, b)
            assert err <= 2 * ref_err + 1e-5, f"{name}: triton error {err:.3g} > 2 x reference error {ref_err:.3g}"
    return got


# Every set length (0/1/7/33/100/129), set count (1-4), head dim (16/32/64/128), dtype, allow pattern and
# padding option appears in at least one case; the full cross product would take too long under the interpreter.
CASES = [
    # dtype, D, q_segments, kv_segments, allow, q_used, kv_used
    ("fp32", 16, [7], [7], "all", False, False),
    ("fp32", 32, [33, 100], [33, 100], "~eye", True, True),
    ("fp16", 64, [1, 0, 129], [129, 1, 7], "row_false", False, True),
    ("fp32", 128, [7, 33, 1, 100], [100, 33, 7, 1], "all_explicit", True, False),
    ("fp16", 16, [33, 7, 0, 1], [1, 33, 7, 0], "~eye", True, True),
    ("fp32", 64, [100], [33, 129], "all", False, True),  # CMF: one decoder set attends to every modality
    ("fp16", 128, [129], [0, 100], "all", True, False),
    ("fp32", 48, [33, 7], [33, 7], "row_false", True, True),  # head dim that is not a power of two
    ("fp16", 32, [100, 129], [100, 129], "~eye", False, False),  # CAF
]


@pytest.mark.parametrize("dtype,d,qs,ks,pattern,use_q,use_kv", CASES)
def test_matches_reference(dtype, d, qs, ks, pattern, use_q, use_kv):
    # zlib.crc32, not hash(): str hashes change per process, which made the inputs (and the test) irreproducible
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, d, qs, ks)).encode()))
    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    batch, heads = 2, 2
    q, k, v, do = _inputs(batch, heads, qs, ks, d, dt, gen)
    q_used = _used(qs, batch, gen) if use_q else None
    kv_used = _used(ks, batch, gen) if use_kv else None
    _compare(q, k, v, do, qs, ks, _allow(pattern, len(qs), len(ks)), q_used, kv_used)


def test_exact_zeros_for_padding_and_keyless_rows():
    gen = torch.Generator().manual_seed(1)
    qs, ks = [33, 7, 5], [33, 7, 5]
    q, k, v, do = _inputs(2, 1, qs, ks, 16, torch.float32, gen)
    allow = torch.ones(3, 3, dtype=torch.bool, device=DEVICE)
    allow[1] = False  # set 1 sees nothing
    allow[2, 1:] = False  # set 2 sees only set 0, which sample 1 leaves empty
    q_used = torch.tensor([[33, 7, 5], [20, 7, 2]], dtype=torch.int32, device=DEVICE)
    kv_used = torch.tensor([[33, 7, 5], [0, 3, 5]], dtype=torch.int32, device=DEVICE)
    out, dq, dk, dv = _compare(q, k, v, do, qs, ks, allow, q_used, kv_used)
    q_pad = ~used_token_mask(qs, q_used, 2, DEVICE)
    kv_pad = ~used_token_mask(ks, kv_used, 2, DEVICE)
    for t, pad in ((out, q_pad), (dq, q_pad), (dk, kv_pad), (dv, kv_pad)):
        assert torch.equal(t.transpose(1, 2)[pad], torch.zeros_like(t.transpose(1, 2)[pad]))
    assert torch.equal(out[:, :, 33:40], torch.zeros_like(out[:, :, 33:40]))  # keyless set
    assert torch.equal(dq[:, :, 33:40], torch.zeros_like(dq[:, :, 33:40]))
    assert torch.equal(out[1, :, 40:], torch.zeros_like(out[1, :, 40:]))  # its only allowed set is empty
    assert torch.equal(dq[1, :, 40:], torch.zeros_like(dq[1, :, 40:]))
    # no query may attend to set 0 keys of sample 1 (none used) -> exact zeros already checked via kv_pad


def test_model_layout_strided_inputs_and_scale():
    gen = torch.Generator().manual_seed(2)
    segs = [33, 7]
    q, k, v, do = _inputs(2, 2, segs, segs, 32, torch.float32, gen, layout="model")
    used = _used(segs, 2, gen)
    _compare(q, k, v, do, segs, segs, _allow("~eye", 2, 2), used, used, scale=0.3)


def test_small_blocks_straddle_many_blocks(monkeypatch):
    """Blocks of 16 queries/keys: many blocks per set, sets that end mid-block, 3 blocks per 33-token set."""
    monkeypatch.setattr(kmod, "FORCE_BLOCKS", {"fwd": (16, 16), "dkdv": (16, 32), "dq": (32, 16)})
    gen = torch.Generator().manual_seed(3)
    qs, ks = [33, 1, 17], [7, 33, 16]
    q, k, v, do = _inputs(1, 2, qs, ks, 16, torch.float32, gen)
    _compare(q, k, v, do, qs, ks, _allow("~eye", 3, 3), _used(qs, 1, gen), _used(ks, 1, gen))


def test_empty_inputs():
    gen = torch.Generator().manual_seed(4)
    q, k, v, do = _inputs(1, 2, [7, 1], [0, 0], 16, torch.float32, gen)  # no key at all
    out, dq, dk, dv = _compare(q, k, v, do, [7, 1], [0, 0], None, None, None)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))
    q, k, v, do = _inputs(1, 2, [0], [7], 16, torch.float32, gen)  # no query at all
    out, dq, dk, dv = _compare(q, k, v, do, [0], [7], None, None, None)
    assert out.shape == (1, 2, 0, 16) and torch.equal(dk, torch.zeros_like(dk))


def test_int64_used_counts_at_and_below_capacity():
    gen = torch.Generator().manual_seed(5)
    segs = [7, 33]
    q, k, v, do = _inputs(2, 1, segs, segs, 16, torch.float32, gen)
    used = torch.tensor([[7, 33], [3, 0]], dtype=torch.int64, device=DEVICE)
    _compare(q, k, v, do, segs, segs, None, used, used)


def test_float64_falls_back_to_reference():
    gen = torch.Generator().manual_seed(6)
    q, k, v, do = _inputs(1, 1, [7], [7], 16, torch.float64, gen)
    got = modality_attention(q, k, v, [7], [7], backend="triton")
    torch.testing.assert_close(got, modality_attention_reference(q, k, v, [7], [7]))


def test_registered_for_auto():
    assert "triton" in _backend.OP_BACKENDS["modality_attention"]
    q = torch.zeros(1, 1, 1, 16)
    assert _backend.resolve("auto", q, "modality_attention") == "reference"  # CPU tensors: reference


def test_torch_compile_traces_without_graph_breaks():
    gen = torch.Generator().manual_seed(7)
    segs = [7, 33]
    q, k, v, do = _inputs(1, 2, segs, segs, 16, torch.float32, gen)
    allow = _allow("~eye", 2, 2)
    used = _used(segs, 1, gen)

    def f(q, k, v):
        return modality_attention(q, k, v, segs, segs, allow, used, used, backend="triton") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qc, kc, vc = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = compiled(qc, kc, vc)
    grads = torch.autograd.grad(out, (qc, kc, vc), do)
    qe, ke, ve = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = f(qe, ke, ve)
    ref_grads = torch.autograd.grad(ref, (qe, ke, ve), do)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_custom_op_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes) of the custom op."""
    gen = torch.Generator().manual_seed(8)
    q, k, v, _ = _inputs(1, 2, [3, 5], [3, 5], 16, torch.float32, gen)
    allow = torch.tensor([[True, False], [True, True]], device=DEVICE)
    used = torch.tensor([[3, 4]], dtype=torch.int32, device=DEVICE)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    result = torch.library.opcheck(torch.ops.mmfuse.modality_attention_fwd.default,
                                   (q, k, v, [3, 5], [3, 5], allow, used, used, 0.25))
    assert set(result.values()) == {"SUCCESS"}, result


# ---------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d,qs,ks,pattern", [
    (64, [225, 225], [225, 225], "~eye"),
    (64, [400], [49, 400], "all"),
    (128, [1, 7, 129], [33, 100, 0], "row_false"),
    (16, [49, 100], [49, 100], "all"),
])
def test_bf16_tolerance_gpu(d, qs, ks, pattern):
    gen = torch.Generator().manual_seed(9)
    q, k, v, do = _inputs(4, 3, qs, ks, d, torch.bfloat16, gen)
    _compare(q, k, v, do, qs, ks, _allow(pattern, len(qs), len(ks)), _used(qs, 4, gen), _used(ks, 4, gen))


@pytest.mark.gpu
def test_fp16_and_fp32_real_shapes_gpu():
    gen = torch.Generator().manual_seed(10)
    segs = [225, 225]
    for dtype in (torch.float16, torch.float32):
        q, k, v, do = _inputs(8, 6, segs, segs, 64, dtype, gen, layout="model")
        used = _used(segs, 8, gen)
        _compare(q, k, v, do, segs, segs, _allow("~eye", 2, 2), used, used)


@pytest.mark.gpu
def test_cuda_graph_capture_reads_used_on_device():
    gen = torch.Generator().manual_seed(11)
    segs = [49, 100]
    q, k, v, _ = _inputs(2, 2, segs, segs, 64, torch.float16, gen)
    used = _used(segs, 2, gen)
    allow = _allow("~eye", 2, 2)
    modality_attention(q, k, v, segs, segs, allow, used, used, backend="triton")  # warm-up: autotune, tables
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = modality_attention(q, k, v, segs, segs, allow, used, used, backend="triton")
    used.copy_(torch.tensor([[10, 3], [49, 100]], dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(out, modality_attention_reference(q, k, v, segs, segs, allow, used, used),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_attention_layer_uses_triton_on_cuda(monkeypatch):
    from mmfuse_fast.models import layers

    assert _backend.resolve("auto", torch.zeros(1, device="cuda"), "modality_attention") == "triton"
    torch.manual_seed(12)
    attn = layers.Attention(96, 6, backend="auto").cuda()
    x = torch.randn(4, 49 + 100, 96, device="cuda")
    allow = ~torch.eye(2, dtype=torch.bool, device="cuda")
    used = torch.tensor([[49, 100], [30, 100], [49, 7], [1, 1]], dtype=torch.int32, device="cuda")
    calls, original = [], _backend.resolve

    def spy(backend, tensor, op, **kwargs):
        calls.append(original(backend, tensor, op, **kwargs))
        return calls[-1]

    monkeypatch.setattr(_backend, "resolve", spy)
    keys = list(attn.state_dict())
    out = attn(x, [49, 100], allow, used)
    assert calls == ["triton"]
    layers.set_backend(attn, "reference")
    ref = attn(x, [49, 100], allow, used)
    assert list(attn.state_dict()) == keys
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_model_auto_backend_matches_reference_on_cuda(monkeypatch):
    """The whole model with ops_backend "auto" on CUDA runs the Triton attention and matches the reference."""
    import dataclasses

    from mmfuse_fast.config import ModelConfig
    from mmfuse_fast.models import MMFuseMAE

    cfg = dataclasses.replace(ModelConfig(), img_size=32, patch_size=8, embed_dim=64, num_heads=4, stem_depth=1,
                              caf_depth=1, encoder_depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=4,
                              proj_dim=16, ops_backend="auto")
    torch.manual_seed(13)
    model = MMFuseMAE(cfg).cuda()
    g = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(4, len(b), 32, 32, generator=g).cuda() for m, b in cfg.modalities.items()}
    batch["label"], batch["id"] = torch.zeros(4, 19), [str(i) for i in range(4)]
    chosen, original = [], _backend.resolve

    def spy(backend, tensor, op, **kwargs):
        chosen.append((op, original(backend, tensor, op, **kwargs)))
        return chosen[-1][1]

    monkeypatch.setattr(_backend, "resolve", spy)
    keys = list(model.state_dict())
    losses, grads = [], []
    for backend in ("auto", "reference"):
        model.set_backend(backend)
        model.zero_grad()
        loss = model(batch, generator=torch.Generator(device="cuda").manual_seed(1))["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert ("modality_attention", "triton") in chosen
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_autotune_pruning_keeps_short_set_tiles():
    for configs in (kmod._FWD_CONFIGS, kmod._DKDV_CONFIGS, kmod._DQ_CONFIGS):
        for lq, lk in ((1, 1), (64, 256), (256, 64), (4096, 4096)):
            for bd in (16, 128, 256):
                kept = kmod._prune(configs, {}, TUNE_LQ=lq, TUNE_LK=lk, BLOCK_D=bd)
                assert kept and all(c in configs for c in kept)
                if lq >= 16 and lk >= 16:
                    assert all(c.kwargs["BLOCK_M"] <= lq and c.kwargs["BLOCK_N"] <= lk for c in kept)
        assert len(kmod._prune(configs, {}, TUNE_LQ=4096, TUNE_LK=4096, BLOCK_D=64)) == len(configs)


_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmfuse_fast.kernels import modality_attention as km

PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
INTS = {"QOFF", "KOFF", "QUSED", "KUSED"}
out = {}
KERNELS = ((km._fwd_kernel, 64, 64), (km._bwd_dkdv_kernel, 32, 64), (km._bwd_dq_kernel, 64, 32))
for dtype, bd, prec, kernels in (("bf16", 64, "tf32", KERNELS), ("fp32", 128, "ieee", KERNELS[:1])):
    for fn, bm, bn in kernels:
        consts = dict(NQ=2, NK=3, HAS_QU=True, HAS_KU=True, HEAD_DIM=bd, BLOCK_D=bd, PREC=prec, BLOCK_M=bm,
                      BLOCK_N=bn)
        sig, attrs = {}, {}
        for i, n in enumerate(fn.arg_names):
            if n.startswith("s_") and n.endswith("d"):
                consts[n] = 1  # unit head-dim stride: what the JIT specializes for the model's layouts
            if n in consts:
                sig[n] = "constexpr"
                continue
            sig[n] = ("*" + dtype if n in PTRS else "*fp32" if n in ("LSE", "DELTA") else "*u8" if n == "ALLOW"
                      else "*i32" if n in INTS else "fp32" if n.endswith("scale") else "i32")
            if sig[n].startswith("*") or (n.startswith("s_") and n[2:4] not in ("qu", "ku")):
                attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        out[f"{fn.__name__}/{dtype}"] = {"pipelined": "async_copy_global_to_local" in k.asm["ttgir"],
                                         "shared": k.metadata.shared}
print(json.dumps(out))
"""


def test_kernels_compile_for_hopper_and_pipeline():
    """Without a GPU: the kernels go through the real compiler (sm_90, ptxas) and their key loops are pipelined."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton wheel without ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result) == 4
    for name, info in result.items():
        assert info["pipelined"], name
        assert info["shared"] <= 227 * 1024, name
