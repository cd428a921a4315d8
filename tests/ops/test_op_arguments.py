"""Degenerate arguments of the fused ops: refused with an error that says what is wrong, before anything is
computed, on every backend that runs here (Triton under TRITON_INTERPRET=1 on a CPU, set by tests/conftest.py);
empty batches give empty results, never NaN."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from mmfuse_fast.engine.step import forbid_host_sync
from mmfuse_fast.ops import _extension, crop_resize, modality_attention, random_boxes

TRITON_RUNS = importlib.util.find_spec("triton") is not None and (torch.cuda.is_available()
                                                                 or os.environ.get("TRITON_INTERPRET") == "1")
ATTENTION_BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1"))]
CROP_BACKENDS = ["reference", pytest.param("extension", marks=pytest.mark.skipif(
    not _extension.has_kernel("crop_resize", "cpu"), reason=f"mmfuse_fast._C not built ({_extension.LOAD_ERROR})"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SEGMENTS = [2, 3]


def _qkv(batch=2, heads=2, head_dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, heads, sum(SEGMENTS), head_dim, generator=g, dtype=dtype).to(DEVICE)
                 for _ in range(3))


def _used(rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


# --- modality_attention --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("which", ["q_used", "kv_used"])
@pytest.mark.parametrize("rows,shown", [([[3, 3], [2, 3]], "[0, 0] = 3"),  # set 0 holds 2 tokens
                                        ([[2, 3], [2, 4]], "[1, 1] = 4"),
                                        ([[2, -1], [2, 3]], "[0, 1] = -1")])
def test_used_lengths_outside_zero_to_capacity_are_refused(backend, which, rows, shown):
    if DEVICE != "cpu":
        pytest.skip("on CUDA the range is a device assert, which leaves the CUDA context unusable")
    q, k, v = _qkv()
    expected = f"{which} must be in [0, capacity] per set; capacities [2, 3]; got {which}{shown}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        modality_attention(q, k, v, SEGMENTS, SEGMENTS, **{which: _used(rows)}, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_used_lengths_outside_capacity_fail_the_cuda_stream(backend):
    """In a separate process: a device assert leaves the CUDA context unusable."""
    code = ("import torch\nfrom mmfuse_fast.ops import modality_attention\n"
            "q = torch.randn(1, 1, 5, 16, device='cuda')\n"
            "used = torch.tensor([[3, 3]], dtype=torch.int32, device='cuda')\n"
            f"modality_attention(q, q, q, [2, 3], [2, 3], kv_used=used, backend={backend!r})\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "device-side assert" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_used_lengths_at_the_bounds_are_accepted_without_a_host_sync(backend):
    q, k, v = _qkv()
    used = _used([[2, 3], [0, 0]])
    with forbid_host_sync():
        out = modality_attention(q, k, v, SEGMENTS, SEGMENTS, q_used=used, kv_used=used, backend=backend)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))  # sample 1: all padding


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_empty_batch_gives_an_empty_result_and_gradient(backend):
    q, k, v = (t[:0].requires_grad_(True) for t in _qkv())
    used = _used([[2, 3]])[:0]
    out = modality_attention(q, k, v, SEGMENTS, SEGMENTS, q_used=used, kv_used=used, backend=backend)
    assert out.shape == (0, 2, 5, 16)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or g.shape == t.shape for g, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("what,change,error,match", [
    ("head dim 0", lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]), ValueError,
     "head dim D must be >= 1"),
    ("NaN scale", lambda a: a.update(scale=float("nan")), ValueError, "scale must be a finite number > 0"),
    ("zero scale", lambda a: a.update(scale=0.0), ValueError, "scale must be a finite number > 0"),
    ("infinite scale", lambda a: a.update(scale=float("inf")), ValueError, "scale must be a finite number > 0"),
    ("integer q, k, v", lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError,
     "one float dtype"),
    ("float used", lambda a: a.update(kv_used=torch.ones(2, 2, device=DEVICE)), ValueError, "kv_used must be int32"),
    ("used of another batch", lambda a: a.update(q_used=_used([[2, 3]])), ValueError, r"q_used must be int32"),
    ("segments that do not sum to L", lambda a: a.update(q_segments=[2, 2]), ValueError, "q_segments"),
    ("negative segment", lambda a: a.update(kv_segments=[6, -1]), ValueError, "kv_segments"),
    ("allow of the wrong shape", lambda a: a.update(allow=torch.ones(2, 3, dtype=torch.bool, device=DEVICE)),
     ValueError, "allow must be bool"),
    ("allow on another device", lambda a: a.update(allow=torch.ones(2, 2, dtype=torch.bool, device="meta")),
     ValueError, "allow is on meta"),
    ("used on another device", lambda a: a.update(kv_used=torch.ones(2, 2, dtype=torch.int32, device="meta")),
     ValueError, "kv_used is on meta"),
    ("v on another device", lambda a: a.update(v=a["v"].to("meta")), ValueError, "one device"),
])
def test_bad_attention_arguments_are_refused(backend, what, change, error, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, q_segments=SEGMENTS, kv_segments=SEGMENTS)
    change(args)
    with pytest.raises(error, match=match):
        modality_attention(**args, backend=backend)


# --- crop_resize / random_boxes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CROP_BACKENDS)
@pytest.mark.parametrize("what,images,boxes,size,match", [
    ("no rows", torch.zeros(1, 2, 0, 8), [[0.0, 0.0, 4.0, 4.0]], (3, 3), r"images are empty \(H=0, W=8\)"),
    ("no columns", torch.zeros(1, 2, 6, 0), [[0.0, 0.0, 4.0, 4.0]], (3, 3), r"images are empty \(H=6, W=0\)"),
    ("infinite box", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, float("inf"), 4.0]], (3, 3), "box 0 .* is not finite"),
    ("NaN box", torch.zeros(1, 2, 6, 8), [[float("nan"), 0.0, 4.0, 4.0]], (3, 3), "box 0 .* is not finite"),
    ("boxes (K, 3)", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, 4.0]], (3, 3), r"boxes must be float \(K, 4\)"),
    ("boxes (4,)", torch.zeros(1, 2, 6, 8), [0.0, 0.0, 4.0, 4.0], (3, 3), r"boxes must be float \(K, 4\)"),
    ("size 0", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, 4.0, 4.0]], (3, 0), r"size must be \(h, w\), two integers"),
    ("negative size", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, 4.0, 4.0]], (-2, 3), "two integers >= 1"),
    ("fractional size", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, 4.0, 4.0]], (3.5, 3), "two integers >= 1"),
    ("one number as size", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, 4.0, 4.0]], 3, "two integers >= 1"),
    ("three numbers as size", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, 4.0, 4.0]], (3, 3, 3), "two integers >= 1"),
    ("bool size", torch.zeros(1, 2, 6, 8), [[0.0, 0.0, 4.0, 4.0]], (True, 3), "two integers >= 1"),
])
def test_bad_crop_arguments_are_refused(backend, what, images, boxes, size, match):
    with pytest.raises(ValueError, match=match):
        crop_resize(images, torch.tensor(boxes), size, backend=backend)


@pytest.mark.parametrize("backend", CROP_BACKENDS)
def test_no_images_and_no_boxes_give_an_empty_result(backend):
    out = crop_resize(torch.zeros(0, 3, 6, 8), torch.zeros(0, 4), (4, 5), backend=backend)
    assert out.shape == (0, 3, 4, 5)


@pytest.mark.parametrize("args,match", [
    (dict(n=-1, height=8, width=8), "n must be >= 0"),
    (dict(n=2, height=0, width=8), "at least one pixel"),
    (dict(n=2, height=8, width=0), "at least one pixel"),
    (dict(n=2, height=8, width=8, ratio=(0.5, float("inf"))), "ratio must satisfy"),
    (dict(n=2, height=8, width=8, ratio=(float("nan"), 2.0)), "ratio must satisfy"),
])
def test_bad_random_boxes_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        random_boxes(**args)


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("temperature, shape, match", [
    (0.0, (2, 4, 8), "temperature must be a finite number > 0; got 0.0"),
    (-0.1, (2, 4, 8), "temperature must be a finite number > 0"),
    (float("nan"), (2, 4, 8), "temperature must be a finite number > 0"),
    (float("inf"), (2, 4, 8), "temperature must be a finite number > 0"),
    (torch.tensor(0.0), (2, 4, 8), "temperature must be a finite number > 0"),
    (0.1, (2, 0, 8), "InfoNCE over an empty batch has no value"),
    (0.1, (0, 4, 8), "at least one scale"),
    (0.1, (2, 4, 0), "one feature"),
])
def test_bad_infonce_arguments_are_refused(backend, temperature, shape, match):
    """A non-positive or non-finite temperature gives NaN or a wrong finite loss; an empty batch a NaN mean."""
    from mmfuse_fast.ops import multiscale_infonce

    views, anchors = torch.randn(shape), torch.randn(shape[1:])
    with pytest.raises(ValueError, match=re.escape(match)):
        multiscale_infonce(anchors, views, temperature, backend=backend)
