"""A/B variants of the Triton `modality_attention` (kernels/modality_attention.py: WRAPPER = "lean", KERNEL =
"static") give exactly the default's numbers, and the fp32 path's precision and tile pruning. Under the Triton
interpreter on a CPU (TRITON_INTERPRET=1, set by tests/conftest.py); the GPU cases are `@pytest.mark.gpu`."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from mmfuse_fast.ops import modality_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from mmfuse_fast.kernels import modality_attention as kmod  # noqa: E402

VARIANTS = [("lean", "default"), ("default", "static"), ("lean", "static")]


def _case(name, gen, dtype=torch.float32, d=16, batch=2, heads=2):
    """(q, k, v, do, q_segments, kv_segments, allow, q_used, kv_used) of a named layout."""
    if name == "self_model_layout":  # the encoder block: strided views of one qkv projection, ~eye, padding
        qs = ks = [33, 7]
        qkv = torch.randn(batch, 40, 3, heads, d, generator=gen).to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        allow = ~torch.eye(2, dtype=torch.bool, device=DEVICE)
        used = torch.tensor([[33, 7], [20, 0]], dtype=torch.int32, device=DEVICE)[:batch]
        q_used = kv_used = used
    elif name == "cross":  # CMF decoder: one query set over two key sets, Lq != Lk
        qs, ks = [45], [33, 7]
        q = torch.randn(batch, heads, 45, d, generator=gen).to(DEVICE, dtype)
        k = torch.randn(batch, heads, 40, d, generator=gen).to(DEVICE, dtype)
        v = torch.randn(batch, heads, 40, d, generator=gen).to(DEVICE, dtype)
        allow, q_used = None, None
        kv_used = torch.tensor([[33, 7], [5, 1]], dtype=torch.int64, device=DEVICE)[:batch]
    elif name == "keyless_rows":  # a set that sees nothing, empty sets, a uint8-free explicit allow
        qs, ks = [7, 0, 17], [17, 0, 7]
        q = torch.randn(batch, heads, 24, d, generator=gen).to(DEVICE, dtype)
        k = torch.randn(batch, heads, 24, d, generator=gen).to(DEVICE, dtype)
        v = torch.randn(batch, heads, 24, d, generator=gen).to(DEVICE, dtype)
        allow = torch.ones(3, 3, dtype=torch.bool, device=DEVICE)
        allow[0] = False
        q_used = kv_used = None
    else:
        raise ValueError(name)
    do = torch.randn(batch, heads, q.shape[2], d, generator=gen).to(DEVICE, dtype)
    return q, k, v, do, qs, ks, allow, q_used, kv_used


def _run(q, k, v, do, qs, ks, allow, q_used, kv_used):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = modality_attention(q, k, v, qs, ks, allow, q_used, kv_used, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


def _default_and_variant(monkeypatch, wrapper, kernel, inputs):
    """(outputs and gradients of the default, of the variant)."""
    results = []
    for switches in (("default", "default"), (wrapper, kernel)):
        monkeypatch.setattr(kmod, "WRAPPER", switches[0])
        monkeypatch.setattr(kmod, "KERNEL", switches[1])
        results.append(_run(*inputs))
    return results


@pytest.mark.parametrize("wrapper,kernel", VARIANTS)
@pytest.mark.parametrize("name", ["self_model_layout", "cross", "keyless_rows"])
def test_variants_equal_the_default_exactly(name, wrapper, kernel, monkeypatch):
    inputs = _case(name, torch.Generator().manual_seed(len(name)))
    want, got = _default_and_variant(monkeypatch, wrapper, kernel, inputs)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and torch.equal(g, w), f"{label} differs under {wrapper}/{kernel}"


def test_static_kernel_with_many_small_blocks(monkeypatch):
    """Blocks of 16: sets ending mid-block, several key blocks per set, the flat loop crossing set boundaries."""
    monkeypatch.setattr(kmod, "FORCE_BLOCKS", {"fwd": (16, 16), "dkdv": (16, 32), "dq": (32, 16)})
    gen = torch.Generator().manual_seed(3)
    qs, ks = [33, 1, 17], [7, 33, 16]
    q, k, v = (torch.randn(1, 2, sum(s), 16, generator=gen).to(DEVICE) for s in (qs, ks, ks))
    do = torch.randn(1, 2, sum(qs), 16, generator=gen).to(DEVICE)
    allow = ~torch.eye(3, dtype=torch.bool, device=DEVICE)
    used = (torch.tensor([[20, 1, 0]], dtype=torch.int32, device=DEVICE),
            torch.tensor([[7, 17, 16]], dtype=torch.int32, device=DEVICE))
    want, got = _default_and_variant(monkeypatch, "default", "static", (q, k, v, do, qs, ks, allow, *used))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_lean_output_is_stored_as_the_block_reads_it(monkeypatch):
    """(B, Lq, H, D) storage: the blocks' head merge `out.transpose(1, 2).reshape(B, L, H * D)` is a view."""
    q, k, v, do, qs, ks, allow, q_used, kv_used = _case("self_model_layout", torch.Generator().manual_seed(0))
    monkeypatch.setattr(kmod, "WRAPPER", "lean")
    out, dq, dk, dv = _run(q, k, v, do, qs, ks, allow, q_used, kv_used)
    batch, heads, lq, d = out.shape
    merged = out.transpose(1, 2).reshape(batch, lq, heads * d)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    # the three gradients share one buffer, laid out as the qkv projection (B, L, 3, H, D)
    buffer = kmod.modality_attention_bwd_packed(do, q, k, v, out, torch.zeros(batch, heads, lq, device=DEVICE),
                                                qs, ks, allow, q_used, kv_used, d ** -0.5)
    assert buffer.numel() == q.numel() + 2 * k.numel()
    views = kmod._packed_grad_views(buffer, q.shape, k.shape)
    assert [t.shape for t in views] == [q.shape, k.shape, v.shape]
    assert views[1].data_ptr() - views[0].data_ptr() == heads * d * buffer.element_size()


@pytest.mark.parametrize("lean,static_layout", [(True, False), (False, True), (True, True)])
def test_variant_ops_opcheck(lean, static_layout):
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(3))
    allow = torch.tensor([[True, False], [True, True]], device=DEVICE)
    used = torch.tensor([[3, 4]], dtype=torch.int32, device=DEVICE)
    result = torch.library.opcheck(torch.ops.mmfuse.modality_attention_fwd.default,
                                   (q, k, v, [3, 5], [3, 5], allow, used, used, 0.25, lean, static_layout))
    assert set(result.values()) == {"SUCCESS"}, result
    out, lse = kmod.modality_attention_fwd(q, k, v, [3, 5], [3, 5], allow, used, used, 0.25, lean, static_layout)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, [3, 5], [3, 5], allow,
            used, used, 0.25)
    result = torch.library.opcheck(torch.ops.mmfuse.modality_attention_bwd_packed.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_variants_trace_without_graph_breaks(monkeypatch):
    q, k, v, do, qs, ks, allow, q_used, kv_used = _case("self_model_layout", torch.Generator().manual_seed(7),
                                                        batch=1)
    monkeypatch.setattr(kmod, "WRAPPER", "lean")
    monkeypatch.setattr(kmod, "KERNEL", "static")

    def f(q, k, v):
        return modality_attention(q, k, v, qs, ks, allow, q_used, kv_used, backend="triton") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    eager = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = f(*eager)
    for a, b in zip((out, *grads), (ref, *torch.autograd.grad(ref, eager, do))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name,value", [("WRAPPER", "fast"), ("KERNEL", "flat")])
def test_unknown_switch_values_are_named(name, value, monkeypatch):
    q, k, v, do, qs, ks, allow, q_used, kv_used = _case("cross", torch.Generator().manual_seed(1))
    monkeypatch.setattr(kmod, name, value)
    with pytest.raises(ValueError, match=f"MMFUSE_ATTN_{name}"):
        modality_attention(q, k, v, qs, ks, allow, q_used, kv_used, backend="triton")


def test_fp32_uses_3xtf32_and_tiles_that_do_not_spill(monkeypatch):
    """fp32 with TF32 off: 3xTF32 on a GPU (not "ieee", whose FMA lowering spills), and the autotuner keeps only
    the tiles that `compile_check --resources` finds spill-free for that precision."""
    monkeypatch.setattr(kmod, "_INTERPRET", False)
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's: monkeypatch cannot restore it
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert kmod._precision(torch.float32) == "tf32x3"
        assert kmod._precision(torch.bfloat16) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kmod._precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    for name, configs in (("fwd", kmod._FWD_CONFIGS), ("dkdv", kmod._DKDV_CONFIGS), ("dq", kmod._DQ_CONFIGS)):
        for block_d in (16, 32, 64):
            kept = kmod._prune(configs, {}, kernel=name, TUNE_LQ=4096, TUNE_LK=4096, BLOCK_D=block_d, PREC="tf32x3")
            assert kept and {kmod._config_key(c) for c in kept} <= kmod._TF32X3_SPILL_FREE[name]
        for block_d in (128, 256):
            kept = kmod._prune(configs, {}, kernel=name, TUNE_LQ=4096, TUNE_LK=4096, BLOCK_D=block_d, PREC="tf32x3")
            assert [kmod._config_key(c) for c in kept] == [kmod._TF32X3_WIDE[name]]
        assert len(kmod._prune(configs, {}, kernel=name, TUNE_LQ=4096, TUNE_LK=4096, BLOCK_D=64,
                               PREC="tf32")) == len(configs)


@pytest.mark.gpu
@pytest.mark.parametrize("wrapper,kernel", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_variants_equal_the_default_gpu(wrapper, kernel, dtype, monkeypatch):
    """Real shapes (56 visible tokens per modality, CAF ~eye and the CMF decoder), autotuned."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, d = 64, 6, 64
    qkv = torch.randn(batch, 112, 3, heads, d, generator=gen).to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    do = torch.randn(batch, heads, 112, d, generator=gen).to(DEVICE, dtype)
    allow = ~torch.eye(2, dtype=torch.bool, device=DEVICE)
    cases = [(q, k, v, do, [56, 56], [56, 56], allow, None, None),
             (torch.randn(batch, heads, 225, d, generator=gen).to(DEVICE, dtype), k, v,
              torch.randn(batch, heads, 225, d, generator=gen).to(DEVICE, dtype), [225], [56, 56], None, None, None)]
    for inputs in cases:
        want, got = _default_and_variant(monkeypatch, wrapper, kernel, inputs)
        for g, w in zip(got, want):  # the autotuner may pick other tiles for the static kernel
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4,
                                       atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
