"""The plain eager fp32 training step: the baseline the engine's TrainStep is measured (bench_train_step.py) and
tested (tests/engine/test_engine_fast_step.py) against. Per-parameter AdamW with a Python learning rate (and weight
decay, when scheduled), `loss.backward()`, clipping (global or per parameter), `optimizer.step()`, then the model's
`after_optimizer_step` hook (an EMA teacher): the stock PyTorch recipe of every registered model, no fusion, no
device-side schedule.

The same step with `autocast=torch.bfloat16`, a model whose attention runs `sdpa_attention` (`use_sdpa(model)`) and
a fused AdamW is the recipe a user would otherwise pick (bench_train_step.py's `stock` rows, under torch.compile)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from mmfuse_fast.config import OptimConfig
from mmfuse_fast.engine.optim import param_groups
from mmfuse_fast.engine.schedule import lr_at

__all__ = ["reference_optimizer", "reference_train_step", "sdpa_attention", "use_sdpa"]


def reference_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the engine's parameter groups: PyTorch's default implementation for the device, or the fused one."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def reference_train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                         step: int, total_steps: int, generator: torch.Generator | None = None,
                         autocast: torch.dtype | None = None) -> dict:
    """Update `step` (0-based) of the model's objective; returns its metrics and gradient norm, detached. With
    `autocast` the forward runs under torch.autocast of that dtype (the backward outside it, as recommended)."""
    if hasattr(model, "set_total_steps"):
        model.set_total_steps(total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg, total_steps)
        if cfg.weight_decay_end is not None and group.get("name") == "decay":
            group["weight_decay"] = _cosine(step, cfg.weight_decay, cfg.weight_decay_end, total_steps)
    step_t = torch.tensor(float(step), dtype=torch.float64, device=next(model.parameters()).device)
    amp = (torch.autocast(step_t.device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    with amp:
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


def sdpa_attention(q, k, v, q_segments, kv_segments, allow=None, q_used=None, kv_used=None, scale=None):
    """`modality_attention` as a user writes it: one SDPA call over the concatenated sets with a boolean
    (B, 1, Lq, Lk) mask of the allowed set pairs and used keys. A row with no key would come out NaN, so it attends
    to every key and is zeroed afterwards; padding queries are zeroed too."""
    from mmfuse_fast.ops.reference import segment_ids, used_token_mask

    batch, device = q.shape[0], q.device
    q_ids, _ = segment_ids(q_segments, device)
    kv_ids, _ = segment_ids(kv_segments, device)
    pairs = (torch.ones(len(q_ids), len(kv_ids), dtype=torch.bool, device=device) if allow is None
             else allow.to(device)[q_ids][:, kv_ids])
    mask = pairs[None, None] & used_token_mask(kv_segments, kv_used, batch, device)[:, None, None, :]
    has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale) * has_key
    if q_used is not None:
        out = out * used_token_mask(q_segments, q_used, batch, device)[:, None, :, None].to(out.dtype)
    return out


def use_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """Points every attention of `model` at `sdpa_attention` (the backend name "sdpa"); its other ops keep the
    model's `ops_backend`. The op is wrapped once per process; other backend names pass through unchanged."""
    from mmfuse_fast import ops
    from mmfuse_fast.models import layers

    if not getattr(ops.modality_attention, "with_sdpa", False):
        fast = ops.modality_attention

        def modality_attention(*args, backend="auto", **kwargs):
            if backend == "sdpa":
                return sdpa_attention(*args, **kwargs)
            return fast(*args, backend=backend, **kwargs)

        modality_attention.with_sdpa = True
        ops.modality_attention = modality_attention
    layers.set_backend(model, "sdpa")
    return model


def _cosine(step: int, start: float, end: float, total_steps: int) -> float:
    progress = min(1.0, max(0.0, step / max(1, total_steps - 1)))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
