"""Plain-PyTorch implementations of the fused ops (the contract of each: docs/architecture.md, "Ops and kernels").

Each function here is at once the CPU fallback, the test oracle of the fast backends and the benchmark
baseline. They favour obviousness over memory: the attention reference materializes the full score matrix and
the InfoNCE reference the full logits.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from mmfuse_fast.infonce_math import all_gather_batch


# --------------------------------------------------------------------------------------------------------------
# modality_attention
# --------------------------------------------------------------------------------------------------------------


def segment_ids(segments: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of a concatenation of sets: (index of its set, position inside its set)."""
    total = int(sum(segments))
    lengths = torch.tensor(list(segments), dtype=torch.long, device=device)
    # output_size: the length is static, so torch.compile sees no data-dependent shape here
    ids = torch.repeat_interleave(torch.arange(len(segments), device=device), lengths, output_size=total)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(total, device=device) - starts[ids]
    return ids, positions


def used_token_mask(segments: Sequence[int], used: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """(B, L) bool: token is inside the used prefix of its set (all True when `used` is None)."""
    ids, positions = segment_ids(segments, device)
    if used is None:
        return torch.ones(batch, len(ids), dtype=torch.bool, device=device)
    return positions[None, :] < used.to(device=device, dtype=torch.long)[:, ids]


def modality_attention_reference(q, k, v, q_segments, kv_segments, allow=None, q_used=None, kv_used=None, scale=None):
    """Softmax attention in which query set i sees key set j only where allow[i, j]."""
    batch, _, _, head_dim = q.shape
    device = q.device
    scale = head_dim**-0.5 if scale is None else scale
    q_ids, _ = segment_ids(q_segments, device)
    kv_ids, _ = segment_ids(kv_segments, device)
    if allow is None:
        pair_allowed = torch.ones(len(q_ids), len(kv_ids), dtype=torch.bool, device=device)
    else:
        pair_allowed = allow.to(device)[q_ids][:, kv_ids]  # (Lq, Lk)
    key_used = used_token_mask(kv_segments, kv_used, batch, device)  # (B, Lk)
    mask = pair_allowed[None, None] & key_used[:, None, None, :]  # (B, 1, Lq, Lk)

    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)
    # Rows without any visible key would softmax to NaN; give them finite scores and zero them afterwards.
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    out = torch.matmul(probs.to(v.dtype), v)
    if q_used is not None:
        query_used = used_token_mask(q_segments, q_used, batch, device)  # (B, Lq)
        out = out * query_used[:, None, :, None].to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# multiscale_infonce
# --------------------------------------------------------------------------------------------------------------


def _directional_ce_sum(rows: torch.Tensor, cols: torch.Tensor, temperature, first_positive: int) -> torch.Tensor:
    """Sum over rows r of CE(rows[s, r] . cols[s]^T / tau, positive = first_positive + r), summed over s."""
    math_dtype = torch.float64 if torch.float64 in (rows.dtype, cols.dtype) else torch.float32
    logits = torch.einsum("sbd,scd->sbc", rows.to(math_dtype), cols.to(math_dtype)) / temperature  # (S, b, B_global)
    targets = torch.arange(rows.shape[1], device=rows.device) + first_positive
    return F.cross_entropy(logits.flatten(0, 1), targets.repeat(rows.shape[0]), reduction="sum")


def multiscale_infonce_reference(anchors, views, temperature=0.1, symmetric=True, group=None):
    """Mean over scales of the InfoNCE loss between anchors[s] and views[s]; materializes the S x B x B logits."""
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0).expand(views.shape[0], -1, -1)
    n_scales, local_batch, _ = views.shape
    if group is None:
        loss = _directional_ce_sum(anchors, views, temperature, 0)
        if symmetric:
            loss = 0.5 * (loss + _directional_ce_sum(views, anchors, temperature, 0))
        return loss / (n_scales * local_batch)

    import torch.distributed as dist

    # Every rank scores its own rows against the global columns; all_gather's backward sums the column gradients
    # of all ranks, so each rank's embeddings get exactly the gradient of the global loss.
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    all_views = all_gather_batch(views, group)
    partial = _directional_ce_sum(anchors, all_views, temperature, rank * local_batch)
    if symmetric:
        all_anchors = all_gather_batch(anchors, group)
        partial = 0.5 * (partial + _directional_ce_sum(views, all_anchors, temperature, rank * local_batch))
    partial = partial / (n_scales * local_batch * world)
    total = partial.detach().clone()
    dist.all_reduce(total, group=group)
    return partial + (total - partial.detach())


# --------------------------------------------------------------------------------------------------------------
# crop_resize / random_boxes
# --------------------------------------------------------------------------------------------------------------


def crop_resize_reference(images: torch.Tensor, boxes: torch.Tensor, size, box_index: torch.Tensor | None = None):
    """Bilinear crop-and-resize through grid_sample; sample points clamped to the image."""
    _, _, height, width = images.shape
    out_h, out_w = size
    if box_index is None:
        box_index = torch.arange(images.shape[0], device=images.device)
    math_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    boxes = boxes.to(math_dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    j = torch.arange(out_w, device=images.device, dtype=math_dtype) + 0.5
    i = torch.arange(out_h, device=images.device, dtype=math_dtype) + 0.5
    xs = (x1[:, None] + j[None] * ((x2 - x1) / out_w)[:, None] - 0.5).clamp(0, width - 1)  # (K, w)
    ys = (y1[:, None] + i[None] * ((y2 - y1) / out_h)[:, None] - 0.5).clamp(0, height - 1)  # (K, h)
    # align_corners=True maps -1..1 onto the first..last pixel centre.
    gx = xs / max(width - 1, 1) * 2 - 1
    gy = ys / max(height - 1, 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (K, h, w, 2)
    source = images[box_index].to(math_dtype)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(images.dtype)


def random_boxes_reference(n, height, width, scale=(0.4, 0.6), ratio=(3 / 4, 4 / 3), generator=None, device=None):
    """Boxes with area fraction ~ U(scale) and log aspect ratio ~ U(log ratio), clipped to what fits the image.

    Unlike torchvision's RandomResizedCrop this never retries (a retry loop needs the host), so the aspect range
    is narrowed per box to the ratios at which a box of that area fits inside the image.
    """
    u = torch.rand(n, 4, generator=generator, device=device, dtype=torch.float32)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    # width/height = r must keep  area*W*H*r <= W^2  and  area*W*H/r <= H^2.
    log_lo = torch.clamp(torch.log(area * width / height), min=math.log(ratio[0]))
    log_hi = torch.clamp(torch.log(width / (area * height)), max=math.log(ratio[1]))
    log_hi = torch.maximum(log_hi, log_lo)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    box_w = torch.sqrt(area * width * height * aspect).clamp(max=width)
    box_h = torch.sqrt(area * width * height / aspect).clamp(max=height)
    x1 = (width - box_w) * u[:, 2]
    y1 = (height - box_h) * u[:, 3]
    return torch.stack([x1, y1, x1 + box_w, y1 + box_h], dim=-1)
