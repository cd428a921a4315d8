"""Loads the optional C++/CUDA extension `mmfuse_fast._C` and completes its ops for torch.library.

Importing `mmfuse_fast._C` registers the schemas of `torch.ops.mmfuse.*` and their CPU (and, in a CUDA build,
CUDA) kernels. This module adds what is written in Python: the fake (meta) kernels used by torch.compile and
FakeTensor, and the autograd formulas. Without the extension (not built, or `MMFUSE_DISABLE_EXTENSION=1`)
`AVAILABLE` is False and the ops fall back to their pure-PyTorch implementations in `ops/reference.py`.
"""

from __future__ import annotations

import os

import torch

LOAD_ERROR: Exception | None = None
_C = None
if os.environ.get("MMFUSE_DISABLE_EXTENSION", "0") != "1":
    try:
        from mmfuse_fast import _C  # noqa: F401  (the import registers the ops)
    except (ImportError, OSError) as error:  # not built, or built against another torch
        LOAD_ERROR = error
else:
    LOAD_ERROR = RuntimeError("disabled by MMFUSE_DISABLE_EXTENSION=1")

AVAILABLE = _C is not None


@torch.compiler.assume_constant_result  # fixed once the extension is loaded: torch.compile evaluates it while tracing
def has_kernel(op: str, device_type: str) -> bool:
    """True when `torch.ops.mmfuse.<op>` has a kernel for this device type ("cpu", "cuda")."""
    if not AVAILABLE:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"mmfuse::{op}", key)


def _channels_last(t: torch.Tensor) -> bool:
    # Same rule as use_channels_last() in csrc/crop_resize_common.h, so fake and real strides agree.
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


if AVAILABLE:

    @torch.library.register_fake("mmfuse::crop_resize")
    def _crop_resize_fake(images, boxes, box_index, out_h, out_w):
        torch._check(images.dim() == 4, lambda: "crop_resize: images must be (N, C, H, W)")
        torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "crop_resize: boxes must be (K, 4)")
        torch._check(box_index.dim() == 1 and box_index.shape[0] == boxes.shape[0],
                     lambda: "crop_resize: box_index must be (K,)")
        fmt = torch.channels_last if _channels_last(images) else torch.contiguous_format
        return images.new_empty((boxes.shape[0], images.shape[1], out_h, out_w)).contiguous(memory_format=fmt)

    @torch.library.register_fake("mmfuse::crop_resize_backward")
    def _crop_resize_backward_fake(grad_out, boxes, box_index, n, height, width):
        torch._check(grad_out.dim() == 4, lambda: "crop_resize_backward: grad_out must be (K, C, h, w)")
        fmt = torch.channels_last if _channels_last(grad_out) else torch.contiguous_format
        return grad_out.new_empty((n, grad_out.shape[1], height, width)).contiguous(memory_format=fmt)

    def _crop_resize_setup(ctx, inputs, output):
        images, boxes, box_index, _, _ = inputs
        ctx.image_shape = images.shape
        ctx.save_for_backward(boxes, box_index)

    def _crop_resize_grad(ctx, grad):
        boxes, box_index = ctx.saved_tensors
        grad_images = None
        if ctx.needs_input_grad[0]:
            n, _, height, width = ctx.image_shape
            grad_images = torch.ops.mmfuse.crop_resize_backward(grad, boxes, box_index, n, height, width)
        return grad_images, None, None, None, None

    torch.library.register_autograd("mmfuse::crop_resize", _crop_resize_grad, setup_context=_crop_resize_setup)

    # The backward is linear in grad_out; its own gradient is the forward op (double backward).
    def _crop_resize_backward_setup(ctx, inputs, output):
        grad_out, boxes, box_index, _, _, _ = inputs
        ctx.out_size = (grad_out.shape[2], grad_out.shape[3])
        ctx.save_for_backward(boxes, box_index)

    def _crop_resize_backward_grad(ctx, grad):
        boxes, box_index = ctx.saved_tensors
        grad_grad_out = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = torch.ops.mmfuse.crop_resize(grad, boxes, box_index, *ctx.out_size)
        return grad_grad_out, None, None, None, None, None

    torch.library.register_autograd("mmfuse::crop_resize_backward", _crop_resize_backward_grad,
                                    setup_context=_crop_resize_backward_setup)
