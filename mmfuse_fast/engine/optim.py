"""AdamW with MAE-style parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mmfuse_fast.config import OptimConfig

__all__ = ["NO_DECAY_NAMES", "param_groups", "build_optimizer", "lr_at", "set_lr", "backward_and_step"]

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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | None = None,
                    engine: bool = False) -> torch.optim.AdamW:
    """AdamW over `param_groups`. `engine=True` (the TrainStep): fused on every device (it skips non-finite steps
    through its `found_inf` input) and capturable on CUDA (its step counts live on the device: CUDA graphs)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if len(cfg.betas) != 2:
        raise ValueError(f"config key 'optim.betas' must hold two numbers, got {cfg.betas}")
    cuda = device is not None and device.type == "cuda"
    if engine:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True, capturable=cuda)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=cuda or None)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of update `step` (0-based): linear warmup to `lr` over `warmup_steps`, then cosine decay to
    `min_lr` at `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """zero_grad, `loss.backward()`, clip the gradients to total norm `grad_clip` (when > 0), `optimizer.step()`.
    Returns the total gradient norm before clipping (a device scalar; no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    return grad_norm
