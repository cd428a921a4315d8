"""crop_resize / random_boxes: every backend against a float64 Python-loop reference (the formula of
docs/architecture.md, "Ops and kernels"), F.interpolate, each other, gradcheck, opcheck and the errors on bad input.
Extension cases skip when mmfuse_fast._C is not built."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmfuse_fast.ops import _extension, crop_resize, random_boxes

HAS_EXT = _extension.has_kernel("crop_resize", "cpu")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"mmfuse_fast._C not built ({_extension.LOAD_ERROR})")
BACKENDS = ["reference", pytest.param("extension", marks=needs_ext)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def loop_reference(images, boxes, size, box_index=None):
    """The formula of docs/architecture.md ("crop_resize"), one output value at a time, in Python float64."""
    n, c, height, width = images.shape
    out_h, out_w = size
    box_index = list(range(n)) if box_index is None else box_index.tolist()
    img = images.double()
    out = torch.empty(len(box_index), c, out_h, out_w, dtype=torch.float64)
    for k, (x1, y1, x2, y2) in enumerate(boxes.double().tolist()):
        for i in range(out_h):
            y = min(max(y1 + (i + 0.5) * (y2 - y1) / out_h - 0.5, 0.0), height - 1.0)
            y0 = int(math.floor(y))
            y1i, fy = min(y0 + 1, height - 1), y - y0
            for j in range(out_w):
                x = min(max(x1 + (j + 0.5) * (x2 - x1) / out_w - 0.5, 0.0), width - 1.0)
                x0 = int(math.floor(x))
                x1i, fx = min(x0 + 1, width - 1), x - x0
                src = img[box_index[k]]
                out[k, :, i, j] = ((1 - fy) * ((1 - fx) * src[:, y0, x0] + fx * src[:, y0, x1i])
                                   + fy * ((1 - fx) * src[:, y1i, x0] + fx * src[:, y1i, x1i]))
    return out


def make_case(n=3, c=5, height=13, width=17, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, c, height, width, generator=g, dtype=dtype)
    boxes = torch.cat([random_boxes(k - 2, height, width, scale=(0.1, 0.9), generator=g),
                       torch.tensor([[0.0, 0.0, width, height],  # the full image
                                     [width - 1.3, 0.2 * height, width, 0.2 * height + min(0.9, 0.7 * height)]])]).to(dtype)  # a sliver at the border
    box_index = torch.randint(0, n, (k,), generator=g)
    return images, boxes, box_index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,size", [((3, 5, 13, 17, 5), (7, 9)), ((2, 1, 1, 7, 4), (3, 5)),
                                        ((1, 3, 9, 4, 3), (11, 1)), ((4, 2, 10, 10, 4), (10, 10))])
def test_matches_python_loop_reference(backend, dtype, shape, size):
    n, c, height, width, k = shape
    images, boxes, box_index = make_case(n, c, height, width, k, dtype=dtype)
    out = crop_resize(images, boxes, size, box_index, backend=backend)
    assert out.shape == (k, c, *size) and out.dtype == dtype
    torch.testing.assert_close(out.double(), loop_reference(images, boxes, size, box_index),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_size,out_size", [((13, 17), (13, 17)), ((13, 17), (29, 40)), ((31, 23), (7, 5)),
                                              ((5, 8), (5, 3))])
def test_full_box_equals_interpolate(backend, in_size, out_size):
    height, width = in_size
    images = torch.randn(2, 3, height, width, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, width, height]] * 2, dtype=torch.float64)
    expected = F.interpolate(images, size=out_size, mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(crop_resize(images, boxes, out_size, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_box_index_is_one_box_per_image(backend):
    images, boxes, _ = make_case(n=4, k=4)
    torch.testing.assert_close(crop_resize(images, boxes, (6, 5), backend=backend),
                               crop_resize(images, boxes, (6, 5), torch.arange(4), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last(backend, dtype):
    images, boxes, box_index = make_case(n=3, c=6, k=7, dtype=dtype)
    expected = crop_resize(images, boxes, (8, 11), box_index, backend=backend)
    out = crop_resize(images.to(memory_format=torch.channels_last), boxes, (8, 11), box_index, backend=backend)
    if backend == "extension":  # same arithmetic in both layouts; the output keeps the input's layout
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, expected)
    torch.testing.assert_close(out, expected)
    # A non-contiguous view that is neither layout.
    wide = torch.randn(3, 6, 13, 40, dtype=dtype)[..., ::2][..., :17]
    torch.testing.assert_close(crop_resize(wide, boxes, (8, 11), box_index, backend=backend),
                               loop_reference(wide, boxes, (8, 11), box_index).to(dtype),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_within_twice_the_reference_error(backend, dtype, channels_last):
    images, boxes, box_index = make_case(n=3, c=4, height=21, width=19, k=6, dtype=torch.float32)
    exact = crop_resize(images, boxes, (9, 14), box_index, backend="reference")
    low = images.to(dtype)
    if channels_last:
        low = low.to(memory_format=torch.channels_last)
    out = crop_resize(low, boxes, (9, 14), box_index, backend=backend)
    assert out.dtype == dtype
    ref_err = (crop_resize(images.to(dtype), boxes, (9, 14), box_index, backend="reference").float() - exact).abs()
    assert (out.float() - exact).abs().max() <= 2 * ref_err.max() + 1e-6


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_extension_equals_fallback(dtype):
    images, boxes, box_index = make_case(n=5, c=14, height=24, width=30, k=9, seed=3, dtype=torch.float32)
    images = images.to(dtype)
    ext = crop_resize(images, boxes, (20, 20), box_index, backend="extension")
    ref = crop_resize(images, boxes, (20, 20), box_index, backend="reference")
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(ext.double(), ref.double(), atol=tol, rtol=tol)


def jittered_case(n, c, height, width, k, size, seed):
    """Boxes whose sample points sit away from pixel centres (>= 0.05 px), so no sample is on a kink."""
    images, boxes, box_index = make_case(n, c, height, width, k, seed=seed)
    boxes = boxes.clone()
    for _ in range(50):
        x1, y1, x2, y2 = boxes.unbind(-1)
        xs = x1[:, None] + (torch.arange(size[1]) + 0.5) * ((x2 - x1) / size[1])[:, None] - 0.5
        ys = y1[:, None] + (torch.arange(size[0]) + 0.5) * ((y2 - y1) / size[0])[:, None] - 0.5
        frac = torch.cat([xs, ys], 1).frac().abs()
        near = ((frac < 0.05) | (frac > 0.95)).any(1)
        if not near.any():
            break
        boxes[near, :2] = (boxes[near, :2] + 0.013).clamp(max=0.9 * boxes[near, 2:])
    return images, boxes, box_index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(backend, channels_last):
    images, boxes, box_index = jittered_case(3, 2, 7, 9, 5, (4, 5), seed=1)
    box_index = torch.tensor([0, 2, 0, 0, 2])  # repeated images: gradients of several boxes accumulate
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    images.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: crop_resize(x, boxes, (4, 5), box_index, backend=backend), (images,))
    if backend == "extension":
        assert torch.autograd.gradgradcheck(lambda x: crop_resize(x, boxes, (4, 5), box_index, backend=backend),
                                            (images,))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_fallback_and_is_deterministic(dtype, channels_last):
    images, boxes, box_index = make_case(n=3, c=5, height=16, width=15, k=8, seed=2, dtype=torch.float32)
    images = images.to(dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    grad = torch.randn(8, 5, 10, 12).to(dtype)
    grads = []
    for backend in ("extension", "extension", "reference"):
        x = images.detach().clone().requires_grad_(True)
        crop_resize(x, boxes, (10, 12), box_index, backend=backend).backward(grad)
        assert x.grad.dtype == dtype
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(grads[0].float(), grads[2].float(), atol=tol, rtol=tol)


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(channels_last, dtype):
    images, boxes, box_index = make_case(n=2, c=3, height=9, width=8, k=3, dtype=dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    images.requires_grad_(True)
    torch.library.opcheck(torch.ops.mmfuse.crop_resize.default, (images, boxes, box_index, 5, 6))
    grad = torch.randn(3, 3, 5, 6, dtype=dtype, requires_grad=True)
    if channels_last:
        grad = grad.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.mmfuse.crop_resize_backward.default, (grad, boxes, box_index, 2, 9, 8))


BAD_INPUTS = [
    ("box beyond the right edge", dict(boxes=[[0.0, 0.0, 9.5, 4.0]]), ValueError),
    ("box starting left of the image", dict(boxes=[[-0.5, 0.0, 4.0, 4.0]]), ValueError),
    ("x2 == x1", dict(boxes=[[2.0, 0.0, 2.0, 4.0]]), ValueError),
    ("y2 < y1", dict(boxes=[[0.0, 4.0, 4.0, 3.0]]), ValueError),
    ("NaN box", dict(boxes=[[0.0, 0.0, float("nan"), 4.0]]), ValueError),
    ("integer images", dict(images=torch.zeros(1, 2, 6, 8, dtype=torch.int32)), TypeError),
    ("3-D images", dict(images=torch.zeros(2, 6, 8)), ValueError),
    ("boxes (K, 5)", dict(boxes=[[0.0, 0.0, 4.0, 4.0, 1.0]]), ValueError),
    ("integer boxes", dict(boxes=torch.tensor([[0, 0, 4, 4]])), ValueError),
    ("box_index out of range", dict(box_index=torch.tensor([1])), IndexError),
    ("negative box_index", dict(box_index=torch.tensor([-1])), IndexError),
    ("int32 box_index", dict(box_index=torch.tensor([0], dtype=torch.int32)), ValueError),
    ("box_index of wrong length", dict(box_index=torch.tensor([0, 0])), ValueError),
    ("two boxes, one image, no box_index", dict(boxes=[[0.0, 0.0, 4.0, 4.0]] * 2), ValueError),
    ("size 0", dict(size=(0, 3)), ValueError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what,args,error", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(backend, what, args, error):
    call = dict(images=torch.zeros(1, 2, 6, 8), boxes=[[0.0, 0.0, 4.0, 4.0]], size=(3, 3), box_index=None)
    call.update(args)
    if not isinstance(call["boxes"], torch.Tensor):
        call["boxes"] = torch.tensor(call["boxes"])
    with pytest.raises(error):
        crop_resize(call["images"], call["boxes"], call["size"], call["box_index"], backend=backend)


@needs_ext
def test_the_op_itself_rejects_bad_boxes():
    images = torch.zeros(2, 2, 6, 8)
    with pytest.raises(ValueError, match="not inside"):
        torch.ops.mmfuse.crop_resize(images, torch.tensor([[0.0, 0.0, 9.0, 4.0]]), torch.tensor([0]), 3, 3)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.mmfuse.crop_resize(images, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([2]), 3, 3)
    with pytest.raises(RuntimeError, match="box_index"):
        torch.ops.mmfuse.crop_resize(images, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([0, 1]), 3, 3)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        crop_resize(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (2, 2), backend="cuda")


def test_without_extension_the_package_falls_back():
    code = ("import torch; from mmfuse_fast.ops import crop_resize, _extension\n"
            "from mmfuse_fast.ops._backend import resolve\n"
            "assert not _extension.AVAILABLE and resolve('auto', 'cpu', 'crop_resize') == 'reference'\n"
            "x = torch.arange(16.0).reshape(1, 1, 4, 4).requires_grad_()\n"
            "out = crop_resize(x, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (4, 4))\n"
            "out.sum().backward(); assert torch.equal(out.detach(), x.detach())\n"
            "try:\n    crop_resize(x, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (4, 4), backend='extension')\n"
            "except RuntimeError as e:\n    assert 'not built' in str(e)\nelse:\n    raise SystemExit(1)\n")
    env = dict(os.environ, MMFUSE_DISABLE_EXTENSION="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_random_boxes_on_device_and_through_crop_resize():
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(64, 30, 40, scale=(0.4, 0.6), generator=g, device="cpu")
    assert boxes.shape == (64, 4) and boxes.dtype == torch.float32
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 40 + 1e-4).all() and (boxes[:, 3] <= 30 + 1e-4).all()
    area = w * h / (30 * 40)
    assert ((area > 0.4 - 1e-4) & (area < 0.6 + 1e-4)).all()
    assert ((w / h > 3 / 4 - 1e-4) & (w / h < 4 / 3 + 1e-4)).all()
    assert torch.equal(boxes, random_boxes(64, 30, 40, generator=torch.Generator().manual_seed(5)))
    # Two crops per scene, as in the cross-scale branch.
    images = torch.randn(32, 3, 30, 40)
    out = crop_resize(images, boxes, (30, 40), torch.arange(32).repeat(2))
    assert out.shape == (64, 3, 30, 40) and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernel_matches_the_cpu(dtype, channels_last):
    if not _extension.has_kernel("crop_resize", "cuda"):
        pytest.skip("the extension was built without its CUDA kernels")
    images, boxes, box_index = make_case(n=4, c=14, height=40, width=36, k=8, seed=4, dtype=torch.float32)
    images = images.to(dtype)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    expected = crop_resize(images, boxes, (24, 24), box_index, backend="reference")
    x = images.cuda().requires_grad_(True)
    out = crop_resize(x, boxes.cuda(), (24, 24), box_index.cuda())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), expected.float(), atol=tol, rtol=tol)
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad.cuda())
    x_cpu = images.clone().requires_grad_(True)
    crop_resize(x_cpu, boxes, (24, 24), box_index, backend="reference").backward(grad)
    torch.testing.assert_close(x.grad.float().cpu(), x_cpu.grad.float(), atol=tol * 4, rtol=tol * 4)
    random = random_boxes(8, 40, 36, device="cuda")
    assert random.device.type == "cuda"
    torch.library.opcheck(torch.ops.mmfuse.crop_resize.default, (x, random, box_index.cuda(), 24, 24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_boxes(backend):
    images = torch.randn(2, 3, 5, 6, requires_grad=True)
    out = crop_resize(images, torch.zeros(0, 4), (4, 4), torch.zeros(0, dtype=torch.long), backend=backend)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert torch.equal(images.grad, torch.zeros_like(images))
