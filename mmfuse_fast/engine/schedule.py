"""Per-step schedules, on the host (for logs) and as device ops on the step counter (inside the step and its CUDA
graph: a value computed from a device counter replays correctly, a Python float would be baked into the capture).

    lr_at(step, cfg, total)          warmup + cosine learning rate of update `step` (0-based), a float
    lr_tensor(step_t, cfg, total)    the same from a float64 0-d device tensor
    cosine_schedule(step_t, start, end, total)
                                     start -> end along a half cosine over `total` updates (weight decay, EMA
                                     momentum, teacher temperature)
"""

from __future__ import annotations

import math

import torch

from mmfuse_fast.config import OptimConfig

__all__ = ["lr_at", "lr_tensor", "cosine_schedule"]


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of update `step` (0-based): linear warmup to `lr` over `warmup_steps`, then cosine decay to
    `min_lr` at `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_tensor(step: torch.Tensor, cfg: OptimConfig, total_steps: int) -> torch.Tensor:
    """`lr_at` as device ops on a float64 0-d step tensor (0-based update index): capturable."""
    span = max(1, total_steps - cfg.warmup_steps)
    progress = ((step - cfg.warmup_steps) / span).clamp(0.0, 1.0)
    cos = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + torch.cos(math.pi * progress))
    if cfg.warmup_steps <= 0:
        return cos
    warm = cfg.lr * (step + 1) / cfg.warmup_steps
    return torch.where(step < cfg.warmup_steps, warm, cos)


def cosine_schedule(step: torch.Tensor, start: float, end: float, total_steps: int) -> torch.Tensor:
    """`start` at update 0 to `end` at update `total_steps - 1` along a half cosine (DINO's schedules), as device
    ops on a float64 0-d step tensor; constant `end` after."""
    progress = (step / max(1, total_steps - 1)).clamp(0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + torch.cos(math.pi * progress))
