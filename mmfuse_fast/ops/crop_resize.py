"""`crop_resize` and `random_boxes`: per-box bilinear crop-and-resize for the cross-scale branch (contract and
backends: docs/architecture.md, "Ops and kernels")."""

from __future__ import annotations

import math
import operator

import torch

from mmfuse_fast.ops import _backend
from mmfuse_fast.ops.reference import crop_resize_reference, random_boxes_reference


def _output_size(size) -> tuple[int, int]:
    """`size` as (h, w): two integers >= 1 (a float or a bool is refused rather than truncated)."""
    message = f"crop_resize: size must be (h, w), two integers >= 1; got {size!r}"
    try:
        if len(size) != 2 or any(isinstance(s, bool) for s in size):
            raise ValueError(message)
        out_h, out_w = operator.index(size[0]), operator.index(size[1])
    except TypeError:
        raise ValueError(message) from None
    if out_h < 1 or out_w < 1:
        raise ValueError(message)
    return out_h, out_w


def _check(images, boxes, box_index, values=True):
    if images.dim() != 4:
        raise ValueError(f"crop_resize: images must be (N, C, H, W); got {tuple(images.shape)}")
    if images.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"crop_resize: images must be float32/float16/bfloat16/float64; got {images.dtype}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"crop_resize: images are empty (H={images.shape[2]}, W={images.shape[3]}); a crop needs "
                         "at least one pixel")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"crop_resize: boxes must be float (K, 4); got {boxes.dtype} {tuple(boxes.shape)}")
    for name, t in (("boxes", boxes), ("box_index", box_index)):
        if t is not None and t.device != images.device:
            raise ValueError(f"crop_resize: {name} is on {t.device} but images are on {images.device}")
    n, _, height, width = images.shape
    if box_index is None:
        if boxes.shape[0] != n:
            raise ValueError(f"crop_resize: without box_index there must be one box per image ({n}); got {boxes.shape[0]}")
    elif box_index.dtype != torch.int64 or tuple(box_index.shape) != (boxes.shape[0],):
        raise ValueError(f"crop_resize: box_index must be int64 ({boxes.shape[0]},); got {box_index.dtype} "
                         f"{tuple(box_index.shape)}")
    # Value checks need the data on the host; on an accelerator they would stall the stream, so there they are
    # asserted asynchronously instead (values=False: the CUDA kernel asserts them itself, saving the launches).
    if not values and boxes.device.type != "cpu":
        return
    eps = 1e-4
    bad_box = ~torch.isfinite(boxes).all(-1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]) \
        | (boxes[:, 0] < -eps) | (boxes[:, 1] < -eps) | (boxes[:, 2] > width + eps) | (boxes[:, 3] > height + eps)
    bad_index = None if box_index is None else (box_index < 0) | (box_index >= n)
    if boxes.device.type == "cpu" and not torch.compiler.is_compiling():  # a traced step asserts like a GPU one
        if bad_box.any():
            k = int(bad_box.nonzero()[0])
            if not all(math.isfinite(c) for c in boxes[k].tolist()):
                raise ValueError(f"crop_resize: box {k} = {boxes[k].tolist()} is not finite")
            raise ValueError(f"crop_resize: box {k} = {boxes[k].tolist()} is not inside the {width}x{height} image "
                             "with x2 > x1 and y2 > y1")
        if bad_index is not None and bad_index.any():
            k = int(bad_index.nonzero()[0])
            raise IndexError(f"crop_resize: box_index[{k}] = {int(box_index[k])} is out of range for {n} images")
    else:
        torch._assert_async(~bad_box.any(), "crop_resize: a box is outside the image or has x2 <= x1 / y2 <= y1")
        if bad_index is not None:
            torch._assert_async(~bad_index.any(), "crop_resize: box_index out of range")


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size, box_index: torch.Tensor | None = None, *,
                backend: str = "auto") -> torch.Tensor:
    """(K, C, h, w): images[box_index[k]] bilinearly sampled on an h x w grid over boxes[k] = (x1, y1, x2, y2).

    Differentiable in `images`. `backend`:
      "extension"  the C++/CUDA op torch.ops.mmfuse.crop_resize (csrc/); an error where it is not built or has no
                   kernel for the device
      "reference"  grid_sample in plain PyTorch, the same sampling points
      "auto"       extension where it is built and has a kernel for the device, else reference
      "triton"     the name `model.ops_backend` gives the fast ops: crop_resize has no Triton kernel, so it means
                   its fast path, the same as "auto"
    The model passes its `ops_backend` ("auto" | "triton" | "reference") here as it does to the other ops."""
    resolved = _backend.resolve(backend, images, "crop_resize")
    out_h, out_w = _output_size(size)
    _check(images, boxes, box_index, values=resolved == "reference")
    if resolved == "reference":
        return crop_resize_reference(images, boxes, (out_h, out_w), box_index)
    if box_index is None:
        box_index = torch.arange(images.shape[0], device=images.device)
    return torch.ops.mmfuse.crop_resize(images, boxes, box_index, out_h, out_w)


def random_boxes(n, height, width, scale=(0.4, 0.6), ratio=(3 / 4, 4 / 3), generator=None, device=None) -> torch.Tensor:
    """(n, 4) float boxes inside a height x width image, area fraction in `scale`, width/height in `ratio`,
    sampled on `device` without a host synchronization."""
    if n < 0:
        raise ValueError(f"random_boxes: n must be >= 0; got {n}")
    if height < 1 or width < 1:
        raise ValueError(f"random_boxes: the image must have at least one pixel; got height={height}, width={width}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"random_boxes: scale must satisfy 0 < lo <= hi <= 1; got {scale}")
    if not (0 < ratio[0] <= ratio[1] < math.inf):
        raise ValueError(f"random_boxes: ratio must satisfy 0 < lo <= hi < inf; got {ratio}")
    return random_boxes_reference(n, height, width, scale, ratio, generator, device)
