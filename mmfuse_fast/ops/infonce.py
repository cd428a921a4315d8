"""`multiscale_infonce`: InfoNCE between full-view and crop-view embeddings at several scales (SPEC §2)."""

from __future__ import annotations

import torch

from mmfuse_fast.ops import _backend
from mmfuse_fast.ops.infonce_chunked import multiscale_infonce_chunked
from mmfuse_fast.ops.reference import multiscale_infonce_reference

# Internal backend name (not part of SPEC §2): the memory-linear PyTorch path that "auto" uses without Triton.
CHUNKED = "chunked"


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


def multiscale_infonce(anchors, views, temperature=0.1, symmetric=True, group=None, backend="auto") -> torch.Tensor:
    """Mean over scales s of CE(anchors[s] . views[s]^T / tau, diagonal), averaged with the transposed direction
    when `symmetric`. With `group`, negatives come from the global batch of the process group.

    Backends: "triton" = fused kernels (CUDA, or CPU under TRITON_INTERPRET=1); "reference" = the naive oracle
    (materializes S x B x B logits); "auto" = Triton on CUDA, else the chunked PyTorch path
    (mmfuse_fast/ops/infonce_chunked.py), which never materializes B x B either. "chunked" forces that path.
    """
    _check(anchors, views, temperature)
    if backend == CHUNKED:
        return multiscale_infonce_chunked(anchors, views, temperature, symmetric, group)
    chosen = _backend.resolve(backend, views, "multiscale_infonce")
    if chosen == "triton" and backend == "auto" and torch.float64 in (anchors.dtype, views.dtype):
        chosen = "reference"  # the kernels compute in fp32; fp64 callers get the exact chunked path
    if chosen == "triton":
        from mmfuse_fast.kernels.infonce import multiscale_infonce_triton

        return multiscale_infonce_triton(anchors, views, temperature, symmetric, group)
    if backend == "auto":
        return multiscale_infonce_chunked(anchors, views, temperature, symmetric, group)
    return multiscale_infonce_reference(anchors, views, temperature, symmetric, group)
