"""`multiscale_infonce`: Triton (fused) and chunked PyTorch backends against the naive reference (contract:
docs/architecture.md, "Ops and kernels"; tolerances: docs/method.md, "Conventions").

On a CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton
is imported): fp32 and fp16, small shapes. bf16 and timings are GPU-only (`@pytest.mark.gpu`).
"""

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from mmfuse_fast.ops import _backend, multiscale_infonce
from mmfuse_fast.ops.infonce_chunked import multiscale_infonce_chunked
from mmfuse_fast.ops.reference import multiscale_infonce_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = _backend.triton_available() and (DEVICE == "cuda" or _backend.triton_interpreted())
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton with CUDA or TRITON_INTERPRET=1")


def _inputs(n_scales, batch, dim, shared, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    views = F.normalize(torch.randn(n_scales, batch, dim, generator=gen), dim=-1)
    anchors = F.normalize(torch.randn(*((batch, dim) if shared else (n_scales, batch, dim)), generator=gen), dim=-1)
    # correlate the positives so that the loss is not trivially log(B)
    anchors = F.normalize(anchors + 0.8 * (views[0] if shared else views), dim=-1)
    return anchors.to(device, dtype), views.to(device, dtype)


def _run(fn, anchors, views, temperature, symmetric):
    a = anchors.detach().clone().requires_grad_()
    v = views.detach().clone().requires_grad_()
    t = temperature.detach().clone().requires_grad_() if isinstance(temperature, torch.Tensor) else temperature
    loss = fn(a, v, t, symmetric)
    loss.backward()
    return loss.detach().float(), a.grad.float(), v.grad.float(), (t.grad.float() if isinstance(t, torch.Tensor) else None)


def _max_err(got, want):
    return [None if g is None else (g - w).abs().max().item() for g, w in zip(got, want)]


def _temperature(kind):
    return torch.tensor(0.07, device=DEVICE) if kind == "tensor" else 0.1


def _triton(a, v, t, symmetric):
    return multiscale_infonce(a, v, t, symmetric, backend="triton")


def _chunked_small(a, v, t, symmetric):  # tiny chunks: many row chunks even for small B
    return multiscale_infonce_chunked(a, v, t, symmetric, chunk_bytes=512)


# (S, B, D, shared anchors, symmetric, temperature kind): every listed value at least once, not the full product.
FP32_CASES = [
    (1, 1, 8, False, True, "float"),
    (3, 1, 100, True, False, "tensor"),
    (1, 3, 128, True, True, "tensor"),
    (3, 3, 8, False, False, "float"),
    (3, 64, 100, False, True, "tensor"),
    (1, 64, 128, True, False, "float"),
    (3, 64, 8, True, True, "float"),
    (1, 257, 8, False, True, "tensor"),
    (3, 257, 8, True, False, "tensor"),
]


def _check_fp32(fn, case):
    n_scales, batch, dim, shared, symmetric, tkind = case
    anchors, views = _inputs(n_scales, batch, dim, shared, torch.float32, seed=batch * 31 + dim)
    want = _run(multiscale_infonce_reference, anchors.double(), views.double(),
                _temperature(tkind).double() if tkind == "tensor" else 0.1, symmetric)
    got = _run(fn, anchors, views, _temperature(tkind), symmetric)
    for name, g, w in zip(("loss", "d_anchors", "d_views", "d_temperature"), got, want):
        if w is None:
            assert g is None
            continue
        err, bound = (g - w.float()).abs().max().item(), 2e-5 * w.abs().max().item() + 2e-6
        if name == "d_temperature":  # Σ G∘L/τ cancels: scale the floor by the size of its terms, ~ loss / τ
            bound += 2e-5 * (abs(want[0].item()) + 1) / 0.07
        assert err <= bound, f"{name} {case}: max error {err} > {bound}"


@needs_triton
@pytest.mark.parametrize("case", FP32_CASES, ids=str)
def test_triton_fp32_matches_reference(case):
    _check_fp32(_triton, case)


@needs_triton
@pytest.mark.parametrize("case", [FP32_CASES[2], FP32_CASES[4], FP32_CASES[6]], ids=str)
def test_triton_atomic_backward_matches_reference(case, monkeypatch):
    """The one-pass backward variant (dA through atomics) gives the same gradients."""
    from mmfuse_fast.kernels import infonce as kinfonce

    monkeypatch.setattr(kinfonce, "BWD_DA_ATOMIC", True)
    _check_fp32(_triton, case)


@pytest.mark.parametrize("case", FP32_CASES, ids=str)
def test_chunked_fp32_matches_reference(case):
    _check_fp32(_chunked_small, case)


@pytest.mark.parametrize("backend,symmetric", [("chunked", True), ("triton", True), ("triton", False)])
def test_compiles_without_graph_breaks(backend, symmetric):
    """The engine's --compile traces the loss: the chunked path must not branch on tensor values, and the Triton
    launchers are custom ops with fakes, so torch.compile(fullgraph=True) traces either whole."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    fn = {"chunked": _chunked_small, "triton": _triton}[backend]
    anchors, views = _inputs(2, 40, 16, backend == "triton", torch.float32)
    compiled = torch.compile(lambda a, v: fn(a, v, 0.1, symmetric), fullgraph=True, backend="aot_eager")
    got = _run(lambda a, v, t, s: compiled(a, v), anchors, views, 0.1, symmetric)
    want = _run(multiscale_infonce_reference, anchors, views, 0.1, symmetric)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_custom_ops_opcheck():
    """Schemas, fakes and AOT dispatch of the two launcher ops."""
    import mmfuse_fast.kernels.infonce  # noqa: F401  (registers the ops)

    a, v = _inputs(2, 9, 16, False, torch.float32)
    tau = torch.tensor(0.1, device=DEVICE)
    ref2 = torch.zeros(2, 9, device=DEVICE)
    for symmetric in (True, False):
        result = torch.library.opcheck(torch.ops.mmfuse.infonce_fwd.default,
                                       (a, v, tau, ref2 if symmetric else None, symmetric))
        assert set(result.values()) == {"SUCCESS"}, result
    lse = torch.zeros(2, 9, device=DEVICE)
    result = torch.library.opcheck(torch.ops.mmfuse.infonce_bwd.default,
                                   (a, v, tau, torch.ones((), device=DEVICE), lse, lse, 0, 0.5, True))
    assert set(result.values()) == {"SUCCESS"}, result


def _check_low_precision(fn, case, dtype):
    """The low-precision tolerance rule (docs/method.md, "Conventions"): error vs the fp32 reference ≤ 2x the error
    of the same-dtype PyTorch reference (+ a tiny floor)."""
    n_scales, batch, dim, shared, symmetric, tkind = case
    anchors, views = _inputs(n_scales, batch, dim, shared, torch.float32, seed=batch + dim)
    t = _temperature(tkind)
    exact = _run(multiscale_infonce_reference, anchors, views, t, symmetric)
    ref_lp = _run(multiscale_infonce_reference, anchors.to(dtype), views.to(dtype), t, symmetric)
    got = _run(fn, anchors.to(dtype), views.to(dtype), t, symmetric)
    for name, e_got, e_ref, w in zip(("loss", "d_anchors", "d_views", "d_temperature"),
                                     _max_err(got, exact), _max_err(ref_lp, exact), exact):
        if w is None:
            continue
        floor = 1e-3 * max(w.abs().max().item(), 1e-6)
        assert e_got <= 2 * e_ref + floor, f"{name} {case}: {e_got} > 2 x {e_ref} + {floor}"


FP16_CASES = [
    (3, 64, 128, False, True, "tensor"),
    (1, 257, 8, True, False, "float"),
    (3, 33, 100, True, True, "float"),
]


@needs_triton
@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_triton_fp16_matches_reference(case):
    _check_low_precision(_triton, case, torch.float16)


@pytest.mark.parametrize("case", FP16_CASES[:1], ids=str)
def test_chunked_fp16_matches_reference(case):
    _check_low_precision(_chunked_small, case, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(2, 1000, 128, False, True, "tensor"), (3, 257, 100, True, False, "float"),
                                  (2, 4097, 256, False, True, "tensor"), (1, 2049, 384, True, True, "float")], ids=str)
def test_triton_bf16_matches_reference(case):
    _check_low_precision(_triton, case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("atomic", [False, True])
def test_triton_gpu_fp16_large_and_both_backward_variants(atomic, monkeypatch):
    from mmfuse_fast.kernels import infonce as kinfonce

    monkeypatch.setattr(kinfonce, "BWD_DA_ATOMIC", atomic)
    _check_low_precision(_triton, (2, 3001, 384, False, True, "tensor"), torch.float16)
    _check_low_precision(_triton, (3, 2048, 128, True, False, "float"), torch.float16)


@pytest.mark.gpu
def test_triton_gpu_memory_is_linear():
    """B = 32768, S = 2: the logits alone would take 8 GiB; the fused op needs O(S·B·D)."""
    anchors, views = _inputs(2, 32768, 128, False, torch.bfloat16)
    anchors.requires_grad_()
    views.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    multiscale_infonce(anchors, views, 0.1, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 256 * 2**20, f"peak extra memory {extra / 2**20:.1f} MiB"


@needs_triton
def test_triton_chunked_head_dim_path(monkeypatch):
    """D larger than the single-tile limit: the kernels loop over D chunks (forced here with a small limit)."""
    from mmfuse_fast.kernels import infonce as kinfonce

    monkeypatch.setattr(kinfonce, "MAX_SINGLE_D", 32)
    _check_fp32(_triton, (2, 40, 100, False, True, "tensor"))
    _check_fp32(_triton, (1, 17, 128, True, False, "float"))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("fn", [pytest.param(_triton, marks=needs_triton, id="triton"),
                                pytest.param(_chunked_small, id="chunked")])
def test_extreme_logits_use_the_exact_column_repair(fn):
    """Tiny temperature, anti-aligned positives: negatives beat positives by ~2/τ = 400 nats. The Triton column
    shift overflows and the repair kernel takes over; the result must still equal the reference."""
    anchors, views = _inputs(2, 40, 16, False, torch.float32, seed=5)
    views = views.clone()
    views[:, :20] = -anchors[:, :20]
    views[:, 7] = -anchors[:, 30]
    t = torch.tensor(0.005, device=DEVICE)
    want = _run(multiscale_infonce_reference, anchors.double(), views.double(), t.double(), True)
    got = _run(fn, anchors, views, t, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4)


def test_auto_uses_the_memory_linear_path_off_cuda(monkeypatch):
    import mmfuse_fast.ops.infonce as op

    def boom(*args, **kwargs):
        raise AssertionError("auto must not use the naive reference")

    monkeypatch.setattr(op, "multiscale_infonce_reference", boom)
    anchors, views = _inputs(2, 9, 16, False, torch.float32, device="cpu")
    loss = multiscale_infonce(anchors, views, 0.1, backend="auto")
    torch.testing.assert_close(loss, multiscale_infonce_reference(anchors, views, 0.1), rtol=1e-5, atol=1e-6)


def test_chunked_never_allocates_b_by_b():
    """The largest logits slice is bounded by chunk_bytes, not by B²: peak extra memory is linear in B."""
    from mmfuse_fast.ops import infonce_chunked

    assert infonce_chunked._rows_per_chunk(2, 65536, infonce_chunked.DEFAULT_CHUNK_BYTES) * 2 * 65536 * 4 \
        <= infonce_chunked.DEFAULT_CHUNK_BYTES


def test_chunked_float64_is_exact():
    anchors, views = _inputs(2, 30, 12, True, torch.float64, device="cpu")
    got = _run(_chunked_small, anchors, views, torch.tensor(0.2, dtype=torch.float64), True)
    want = _run(multiscale_infonce_reference, anchors, views, torch.tensor(0.2, dtype=torch.float64), True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_global_negatives_equal_single_process():
    """2 CPU processes over gloo: loss and local gradients equal the single-process loss on the full batch."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _dist_infonce_worker

    backends = ["reference", "chunked"] + (["triton"] if HAS_TRITON and DEVICE == "cpu" else [])
    mp.spawn(_dist_infonce_worker.run, args=(2, _free_port(), backends), nprocs=2, join=True)


# --------------------------------------------------------------------------------------------------------------
# fp32 whatever the autocast state; the forward op's inputs unchanged; the fp32 D = 256 path; A/B variants
# --------------------------------------------------------------------------------------------------------------


def _extreme_inputs():
    """Negatives beat positives by ~2/τ = 400 nats at τ = 0.005: the column shift overflows, the repair runs."""
    anchors, views = _inputs(2, 40, 16, False, torch.float32, seed=5)
    views = views.clone()
    views[:, :20] = -anchors[:, :20]
    views[:, 7] = -anchors[:, 30]
    return anchors, views, torch.tensor(0.005, device=DEVICE)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_forward_op_does_not_write_its_inputs():
    """The column repair rewrites the shift of overflowing columns: into an output, never into `ref2` (the op
    declares no mutated argument, so torch.compile may reuse or recompute `ref2` after the call)."""
    import mmfuse_fast.kernels.infonce  # noqa: F401  (registers the ops)

    anchors, views, tau = _extreme_inputs()
    pos = torch.einsum("sbd,sbd->sb", anchors, views) / tau
    ref2 = (pos * 1.4426950408889634).contiguous()
    before = ref2.clone()
    outputs = torch.ops.mmfuse.infonce_fwd(anchors, views, tau, ref2, True)
    assert torch.equal(ref2, before), "infonce_fwd wrote into its input ref2"
    _, col_ref2, col_sum = outputs
    assert not torch.equal(col_ref2, before), "the repaired columns' shift must come back as an output"
    assert torch.isfinite(col_sum).all()
    result = torch.library.opcheck(torch.ops.mmfuse.infonce_fwd.default, (anchors, views, tau, ref2, True),
                                   test_utils=("test_schema",))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "chunked", "reference"])
@pytest.mark.parametrize("shared", [False, True])
def test_loss_is_fp32_under_bf16_autocast(backend, shared):
    """The engine runs the model under bf16 autocast: the loss (positive logits included) must still be computed
    from fp32 embeddings in fp32, equal to the loss without autocast."""
    anchors, views = _inputs(2, 48, 32, shared, torch.float32, seed=3)
    t = torch.tensor(0.1, device=DEVICE)

    def fn(a, v, tau, symmetric):
        return multiscale_infonce(a, v, tau, symmetric, backend=backend)

    def under_autocast(a, v, tau, symmetric):  # backward outside the region, as the engine's step runs it
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            return fn(a, v, tau, symmetric)

    want = _run(fn, anchors, views, t, True)
    got = _run(under_autocast, anchors, views, t, True)
    for name, g, w in zip(("loss", "d_anchors", "d_views", "d_temperature"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} under autocast: {m}")


@needs_triton
def test_triton_fp32_wide_embedding_tf32x3_tiles(monkeypatch):
    """The path `base` takes: fp32 embeddings of D = 256 with 3xTF32 products, whose tiles cover 128 dims at most,
    so the kernels loop over D chunks. The interpreter computes the products in fp32; the tiles and the loop are
    the GPU's."""
    from mmfuse_fast.kernels import infonce as kinfonce

    monkeypatch.setattr(kinfonce, "_precision", lambda dtype: "tf32x3")
    assert not kinfonce._config(256, "fwd", "tf32x3")["SINGLE_D"]
    _check_fp32(_triton, (2, 40, 256, False, True, "tensor"))
    _check_fp32(_triton, (1, 33, 256, True, False, "float"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(2, 4097, 256, False, True, "tensor"), (3, 1000, 256, True, False, "float"),
                                  (2, 2048, 128, False, True, "tensor")], ids=str)
def test_triton_gpu_fp32_3xtf32_matches_reference(case):
    """fp32 embeddings with TF32 off: 3xTF32 products (D = 256: chunked head dim) against the fp64 reference."""
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's: monkeypatch cannot restore it
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        _check_fp32(_triton, case)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@needs_triton
@pytest.mark.parametrize("variant", ["relaxed", "relaxed_staggered"])
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_col_sum_variants_match_the_default(variant, extreme, monkeypatch):
    """kernels.infonce.COL_SUMS: relaxed atomics and the staggered column sweep give the default's loss and
    gradients (sums in another order: equal up to rounding). Several row and column blocks, a ragged last one."""
    from mmfuse_fast.kernels import infonce as kinfonce

    if extreme:
        anchors, views, t = _extreme_inputs()
    else:
        anchors, views = _inputs(2, 97, 16, False, torch.float32, seed=11)
        t = torch.tensor(0.1, device=DEVICE)
    monkeypatch.setattr(kinfonce, "COL_SUMS", "acq_rel")
    want = _run(_triton, anchors, views, t, True)
    monkeypatch.setattr(kinfonce, "COL_SUMS", variant)
    got = _run(_triton, anchors, views, t, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_col_sum_variant_names_are_checked(monkeypatch):
    from mmfuse_fast.kernels import infonce as kinfonce

    monkeypatch.setattr(kinfonce, "COL_SUMS", "fast")
    with pytest.raises(ValueError, match="MMFUSE_INFONCE_COL_SUMS"):
        kinfonce.col_sum_variant()
