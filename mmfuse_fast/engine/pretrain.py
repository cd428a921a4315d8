"""Self-supervised pretraining: the step loop, written to read like the recipe.

    dataset -> seeded endless loader -> model -> AdamW -> for each step: lr, train_step, log, checkpoint

`train_step` holds everything that happens per step on the device (forward, backward, clipping, update) so a
faster step (CUDA graphs, AMP, DDP) can replace it without touching the loop.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmfuse_fast.config import PretrainConfig, save_config
from mmfuse_fast.engine.checkpoint import (CheckpointError, config_hash, load_checkpoint, rng_state,
                                           save_checkpoint, set_rng_state)
from mmfuse_fast.engine.data import build_loader, to_device
from mmfuse_fast.engine.logging import LoggingConfig, MetricLogger, truncate_metrics
from mmfuse_fast.engine.optim import build_optimizer, lr_at, set_lr
from mmfuse_fast.engine.runtime import prepare_run_dir, resolve_device, seed_everything, validate_config

__all__ = ["pretrain", "train_step", "restore_training_state", "training_state"]

CONFIG_NAME = "config.yaml"


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, grad_clip: float,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step; returns detached device scalars (loss, loss_rec, loss_con, grad_norm). No host
    sync."""
    out = model(batch, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    return {"loss": out["loss"].detach(), "loss_rec": out["loss_rec"].detach(),
            "loss_con": out["loss_con"].detach(), "grad_norm": grad_norm.detach()}


def training_state(step: int, optimizer: torch.optim.Optimizer, samples_seen: int, cfg_hash: str,
                   generators: dict[str, torch.Generator]) -> dict:
    """What besides the weights a run needs to continue exactly: plain values and tensors only."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "samples_seen": samples_seen,
        "config_hash": cfg_hash,
        "rng": rng_state(generators),
    }


def restore_training_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg_hash: str,
                           generators: dict[str, torch.Generator]) -> dict:
    state = load_checkpoint(ckpt, model)
    if state.get("config_hash") != cfg_hash:
        raise CheckpointError(
            f"cannot resume from {ckpt}: the config differs from the run's (hash {state.get('config_hash')} vs "
            f"{cfg_hash}); only train.steps, log/checkpoint intervals, device, data.root and data.num_workers may "
            f"change on resume"
        )
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], generators)
    return state


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False, dataset: Dataset | None = None,
             progress: bool = True) -> dict:
    """Pretrains `cfg.model` on `cfg.data.splits`; writes config.yaml, metrics.jsonl and checkpoints to `run_dir`.

    `dataset` replaces the configured dataset (tests, experiment runners). Returns a summary: run_dir, step,
    the last logged metrics, the final checkpoint path and the wall time."""
    from mmfuse_fast.data import build_dataset
    from mmfuse_fast.models import build_model

    validate_config(cfg)
    run_dir, ckpt = prepare_run_dir(run_dir, resume)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    t_start = time.perf_counter()

    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.data.splits, bands=cfg.model.modalities)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    generator = torch.Generator(device).manual_seed(cfg.train.seed)  # masks and crops
    generators = {"model": generator}
    cfg_hash = config_hash(cfg)

    step = 0
    if ckpt is not None:
        step = restore_training_state(ckpt, model, optimizer, cfg_hash, generators)["step"]
    truncate_metrics(run_dir, step)  # a resumed run re-logs what came after its checkpoint
    save_config(cfg, run_dir / CONFIG_NAME)

    steps, batch_size = cfg.train.steps, cfg.train.batch_size
    loader = build_loader(dataset, batch_size, cfg.train.seed, start=step * batch_size,
                          num_workers=cfg.data.num_workers, device=device)
    batches = iter(loader)
    model.train()
    last_ckpt = ckpt
    logger = MetricLogger(run_dir, LoggingConfig(every=cfg.train.log_every, progress=progress), total_steps=steps,
                          start_step=step, desc="pretrain", batch_size=batch_size)
    with logger:
        while step < steps:
            batch = to_device(next(batches), device)
            lr = lr_at(step, cfg.optim, steps)
            set_lr(optimizer, lr)
            metrics = train_step(model, batch, optimizer, cfg.optim.grad_clip, generator)
            step += 1
            logger.accumulate(step, metrics)

            if logger.should_log(step) or step == steps:
                logger.log(step, {"lr": lr})
            if step % cfg.train.checkpoint_every == 0 or step == steps:
                logger.check_finite()  # never save non-finite weights
                state = training_state(step, optimizer, step * batch_size, cfg_hash, generators)
                last_ckpt = save_checkpoint(run_dir, step, model, state)
        logger.check_finite()

    return {
        "run_dir": str(run_dir),
        "step": step,
        "metrics": logger.last,
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
