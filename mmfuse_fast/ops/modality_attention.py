"""`modality_attention`: attention across modality token sets with a set-level allow matrix (contract and backends:
docs/architecture.md, "Ops and kernels").

Arguments are checked before anything is computed. Shapes, dtypes, devices, segment lengths and `scale` are host
metadata and are checked on every call. The used lengths (`q_used`, `kv_used`) are tensor values, which a host can
only read by waiting for the device, and which neither a CUDA graph capture nor a torch.compile trace can read: they
are checked in eager calls only (a captured step's warm-up calls are eager), on the CPU with an immediate ValueError
naming the first bad entry, on an accelerator with an asynchronous device assert (no host synchronization; it fails
the next synchronization). Inside a capture or a trace they are not checked at all.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mmfuse_fast.ops import _backend
from mmfuse_fast.ops.reference import modality_attention_reference


def _check(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"modality_attention: q, k, v must be (B, H, L, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"modality_attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"modality_attention: the head dim D must be >= 1; got q {tuple(q.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"modality_attention: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"modality_attention: scale must be a finite number > 0; got {scale}")
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
    for name, t in (("allow", allow), ("q_used", q_used), ("kv_used", kv_used)):
        if t is not None and t.device != q.device:
            raise ValueError(f"modality_attention: {name} is on {t.device} but q is on {q.device}")
    for name, used, segments in (("q_used", q_used, q_segments), ("kv_used", kv_used, kv_segments)):
        if used is not None and (used.dtype not in (torch.int32, torch.int64)
                                 or tuple(used.shape) != (q.shape[0], len(segments))):
            raise ValueError(f"modality_attention: {name} must be int32 or int64 ({q.shape[0]}, {len(segments)}); got "
                             f"{used.dtype} {tuple(used.shape)}")
        if used is not None:
            _check_used_in_range(name, used, segments)


def _check_used_in_range(name: str, used: torch.Tensor, segments: list[int]) -> None:
    """Every used[b, j] in [0, segments[j]]: outside it the kernels would read other sets' tokens as this one's."""
    if not segments or torch.compiler.is_compiling() or (used.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    # one comparison per set against a Python int: no capacity tensor to copy to the device
    in_range = torch.stack([((used[:, j] >= 0) & (used[:, j] <= capacity)).all()
                            for j, capacity in enumerate(segments)]).all()
    message = f"modality_attention: {name} must be in [0, capacity] per set; capacities {segments}"
    if used.device.type != "cpu":
        torch._assert_async(in_range, message)
        return
    try:
        torch._assert_async(in_range, message)  # raises now on the CPU, without an op that reads a value on the host
    except RuntimeError:
        bad = ((used < 0) | (used > torch.tensor(segments, dtype=used.dtype))).nonzero()[0].tolist()
        raise ValueError(f"{message}; got {name}[{bad[0]}, {bad[1]}] = {int(used[bad[0], bad[1]])}") from None


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
    _check(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale)
    chosen = _backend.resolve(backend, q, "modality_attention")
    if chosen == "triton":
        from mmfuse_fast.kernels import modality_attention as kernels

        if kernels.supports(q.dtype, q.shape[-1]):
            return kernels.modality_attention_triton(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale)
    return modality_attention_reference(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale)
