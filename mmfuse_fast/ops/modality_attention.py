"""`modality_attention`: attention across modality token sets with a set-level allow matrix (contract and backends:
docs/architecture.md, "Ops and kernels")."""

from __future__ import annotations

from typing import Sequence

import torch

from mmfuse_fast.ops import _backend
from mmfuse_fast.ops.reference import modality_attention_reference


def _check(q, k, v, q_segments, kv_segments, allow, q_used, kv_used):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"modality_attention: q, k, v must be (B, H, L, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"modality_attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16,
                                                               torch.float64):
        raise TypeError(f"modality_attention: q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if sum(q_segments) != q.shape[2] or any(n < 0 for n in q_segments):
        raise ValueError(f"modality_attention: q_segments {list(q_segments)} must sum to Lq={q.shape[2]}")
    if sum(kv_segments) != k.shape[2] or any(n < 0 for n in kv_segments):
        raise ValueError(f"modality_attention: kv_segments {list(kv_segments)} must sum to Lk={k.shape[2]}")
    if allow is not None and (allow.dtype != torch.bool or tuple(allow.shape) != (len(q_segments), len(kv_segments))):
        raise ValueError(f"modality_attention: allow must be bool ({len(q_segments)}, {len(kv_segments)}); got "
                         f"{allow.dtype} {tuple(allow.shape)}")
    for name, used, segments in (("q_used", q_used, q_segments), ("kv_used", kv_used, kv_segments)):
        if used is not None and (used.dtype not in (torch.int32, torch.int64)
                                 or tuple(used.shape) != (q.shape[0], len(segments))):
            raise ValueError(f"modality_attention: {name} must be int32 ({q.shape[0]}, {len(segments)}); got "
                             f"{used.dtype} {tuple(used.shape)}")


def modality_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_segments: Sequence[int],
    kv_segments: Sequence[int],
    allow: torch.Tensor | None = None,
    q_used: torch.Tensor | None = None,
    kv_used: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Queries of set i attend to the used keys of every set j with allow[i, j]; (B, H, Lq, D) out.

    Rows with no allowed, used key and padding queries (past q_used) return zeros. `backend`: "triton" (fused
    kernels; CUDA, or the CPU under TRITON_INTERPRET=1; float64 and head dims above 256, which have no kernel, run
    the reference), "reference" (plain PyTorch, the full score matrix) or "auto" (triton for CUDA tensors, else
    reference).
    """
    q_segments, kv_segments = [int(n) for n in q_segments], [int(n) for n in kv_segments]
    _check(q, k, v, q_segments, kv_segments, allow, q_used, kv_used)
    chosen = _backend.resolve(backend, q, "modality_attention")
    if chosen == "triton":
        from mmfuse_fast.kernels import modality_attention as kernels

        if kernels.supports(q.dtype, q.shape[-1]):
            return kernels.modality_attention_triton(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale)
    return modality_attention_reference(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale)
