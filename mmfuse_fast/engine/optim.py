"""AdamW with MAE-style parameter groups (schedules: engine/schedule.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse_fast.config import OptimConfig

__all__ = ["NO_DECAY_NAMES", "param_groups", "build_optimizer"]

# Learned embeddings and tokens are not decayed (MAE, CROMA); neither are norms and biases (any tensor with < 2 dims).
NO_DECAY_NAMES = ("mask_token", "cls_token", "pos_embed", "modality_embed")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or any(s in name for s in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: decayed weights and non-decayed norms/biases/embeddings/tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | None = None) -> torch.optim.AdamW:
    """The engine's AdamW over `param_groups`: fused on every device (it skips non-finite steps through its
    `found_inf` input) and capturable on CUDA (its step counts live on the device: CUDA graphs).

    With a weight-decay schedule (`optim.weight_decay_end`) the optimizer's own decay is 0 and the TrainStep
    applies the scheduled decay itself: fused AdamW would bake a Python `weight_decay` into a captured graph."""
    scheduled = cfg.weight_decay_end is not None
    groups = param_groups(model, 0.0 if scheduled else cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if len(cfg.betas) != 2:
        raise ValueError(f"config key 'optim.betas' must hold two numbers, got {cfg.betas}")
    cuda = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True, capturable=cuda)
