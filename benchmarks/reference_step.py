"""The plain eager fp32 training step: the baseline the engine's TrainStep is measured (bench_train_step.py) and
tested (tests/engine/test_engine_fast_step.py) against. Per-parameter AdamW with a Python learning rate (and weight
decay, when scheduled), `loss.backward()`, clipping (global or per parameter), `optimizer.step()`, then the model's
`after_optimizer_step` hook (an EMA teacher): the stock PyTorch recipe of every registered model, no fusion, no
device-side schedule."""

from __future__ import annotations

import math

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
    if hasattr(model, "set_total_steps"):
        model.set_total_steps(total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg, total_steps)
        if cfg.weight_decay_end is not None and group.get("name") == "decay":
            group["weight_decay"] = _cosine(step, cfg.weight_decay, cfg.weight_decay_end, total_steps)
    step_t = torch.tensor(float(step), dtype=torch.float64, device=next(model.parameters()).device)
    out = model(batch, generator=generator, step=step_t)
    optimizer.zero_grad(set_to_none=True)
    out["objective"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    if cfg.grad_clip > 0 and cfg.grad_clip_mode == "per_parameter":
        norms = [g.norm() for g in grads]
        for g, n in zip(grads, norms):  # DINO's clip_gradients
            g.mul_(torch.clamp(cfg.grad_clip / (n + 1e-6), max=1.0))
        grad_norm = torch.linalg.vector_norm(torch.stack(norms))
    elif cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(grads)
    optimizer.step()
    hook = getattr(model, "after_optimizer_step", None)
    if hook is not None:
        hook(step_t, torch.zeros((), dtype=torch.bool, device=step_t.device))
    metrics = {name: out[name].detach() for name in model.metric_names}
    return {**metrics, "grad_norm": grad_norm.detach()}


def _cosine(step: int, start: float, end: float, total_steps: int) -> float:
    progress = min(1.0, max(0.0, step / max(1, total_steps - 1)))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
