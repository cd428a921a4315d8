"""The plain eager fp32 training step: the baseline the engine's TrainStep is measured (bench_train_step.py) and
tested (tests/engine/test_engine_fast_step.py) against. Per-parameter AdamW with a Python learning rate,
`loss.backward()`, clipping, `optimizer.step()`: the stock PyTorch recipe, no fusion, no device-side schedule."""

from __future__ import annotations

import torch

from mmfuse_fast.config import OptimConfig
from mmfuse_fast.engine.optim import param_groups
from mmfuse_fast.engine.schedule import lr_at

__all__ = ["reference_optimizer", "reference_train_step"]


def reference_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the engine's parameter groups, PyTorch's default implementation for the device."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))


def reference_train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                         step: int, total_steps: int, generator: torch.Generator | None = None) -> dict:
    """Update `step` (0-based) of the model's objective; returns its metrics and gradient norm, detached."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg, total_steps)
    out = model(batch, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out["objective"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    metrics = {name: out[name].detach() for name in model.metric_names}
    return {**metrics, "grad_norm": grad_norm.detach()}
