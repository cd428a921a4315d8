"""`multiscale_infonce`: InfoNCE between full-view and crop-view embeddings at several scales (contract and
backends: docs/architecture.md, "Ops and kernels")."""

from __future__ import annotations

import math

import torch

from mmfuse_fast.ops import _backend
from mmfuse_fast.ops.infonce_chunked import multiscale_infonce_chunked
from mmfuse_fast.ops.reference import multiscale_infonce_reference


def _check(anchors, views, temperature):
    if views.dim() != 3:
        raise ValueError(f"multiscale_infonce: views must be (S, B, D); got {tuple(views.shape)}")
    if anchors.dim() == 2:
        expected = views.shape[1:]
        got = anchors.shape
    elif anchors.dim() == 3:
        expected, got = views.shape, anchors.shape
    else:
        raise ValueError(f"multiscale_infonce: anchors must be (B, D) or (S, B, D); got {tuple(anchors.shape)}")
    if tuple(got) != tuple(expected):
        raise ValueError(f"multiscale_infonce: anchors {tuple(anchors.shape)} do not match views {tuple(views.shape)}")
    if not anchors.is_floating_point() or not views.is_floating_point():
        raise TypeError("multiscale_infonce: anchors and views must be floating point")
    if isinstance(temperature, torch.Tensor) and temperature.dim() != 0:
        raise ValueError(f"multiscale_infonce: temperature must be a float or a 0-d tensor; got {tuple(temperature.shape)}")
    # A device tensor's value is not read: that would be a host sync inside the captured step.
    value = temperature.item() if isinstance(temperature, torch.Tensor) and temperature.device.type == "cpu" \
        else temperature
    if not isinstance(value, torch.Tensor) and not (float(value) > 0 and math.isfinite(float(value))):
        raise ValueError(f"multiscale_infonce: temperature must be a finite number > 0; got {value}")
    scales, batch, dim = views.shape
    if scales == 0 or batch == 0 or dim == 0:
        raise ValueError(f"multiscale_infonce: needs at least one scale, one sample and one feature; got views "
                         f"{tuple(views.shape)} (S, B, D): InfoNCE over an empty batch has no value")


def multiscale_infonce(anchors, views, temperature=0.1, symmetric=True, group=None, backend="auto") -> torch.Tensor:
    """Mean over scales s of CE(anchors[s] . views[s]^T / tau, diagonal), averaged with the transposed direction
    when `symmetric`. With `group`, negatives come from the global batch of the process group.

    Backends: "triton" = fused kernels (CUDA, or the CPU under TRITON_INTERPRET=1); "chunked" = plain PyTorch over
    row chunks (mmfuse_fast/ops/infonce_chunked.py), memory linear in B; "reference" = the naive oracle
    (materializes S x B x B logits); "auto" = triton for CUDA tensors (not float64), else chunked.
    """
    _check(anchors, views, temperature)
    dtype = torch.promote_types(anchors.dtype, views.dtype)
    chosen = _backend.resolve(backend, views, "multiscale_infonce", dtype=dtype)
    if chosen == "triton":
        from mmfuse_fast.kernels.infonce import multiscale_infonce_triton

        return multiscale_infonce_triton(anchors, views, temperature, symmetric, group)
    if chosen == "chunked":
        return multiscale_infonce_chunked(anchors, views, temperature, symmetric, group)
    with torch.autocast(views.device.type, enabled=False):  # fp32 logits under autocast, as the other backends
        return multiscale_infonce_reference(anchors, views, temperature, symmetric, group)
