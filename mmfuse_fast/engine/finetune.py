"""Downstream multi-label classification: a linear probe (frozen encoder) or full fine-tuning on a pretrained run.

A fine-tuning run directory holds::

    config.yaml           the resolved FinetuneConfig
    model.yaml            the backbone's ModelConfig (what evaluate needs to rebuild the classifier)
    label_subset.json     the training samples drawn for cfg.label_fraction (indices into the training set + ids)
    metrics.jsonl         training loss per log interval
    checkpoints/          classifier weights (backbone + head, safetensors) and training state
    metrics_<split>.json  evaluation metrics (written at the end for cfg.eval_split, and by `evaluate`)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mmfuse_fast.config import FinetuneConfig, ModelConfig, PretrainConfig, from_dict, load_config, save_config, to_dict
from mmfuse_fast.engine.checkpoint import (CheckpointError, atomic_write_text, config_hash, load_weights,
                                           resolve_weights, save_checkpoint)
from mmfuse_fast.engine.data import build_loader, to_device
from mmfuse_fast.engine.logging import LoggingConfig, MetricLogger, truncate_metrics
from mmfuse_fast.engine.optim import build_optimizer, lr_at, set_lr
from mmfuse_fast.engine.pretrain import CONFIG_NAME, restore_training_state, training_state
from mmfuse_fast.engine.runtime import prepare_run_dir, resolve_device, seed_everything, validate_config

__all__ = ["finetune", "finetune_step", "FeatureCache", "build_classifier", "pretrained_model_config", "draw_label_subset",
           "MODEL_CONFIG_NAME", "LABEL_SUBSET_NAME"]

MODEL_CONFIG_NAME = "model.yaml"
LABEL_SUBSET_NAME = "label_subset.json"
NUM_CLASSES = 19
MODES = ("linear", "full")


def _find_run_dir(path: Path) -> Path | None:
    """The run directory holding a weights file or checkpoint directory (the nearest parent with config.yaml)."""
    for parent in [path, *path.parents][:4]:
        if (parent / CONFIG_NAME).is_file():
            return parent
    return None


def pretrained_model_config(pretrained: str | Path) -> ModelConfig:
    """The ModelConfig of a pretraining run (its config.yaml), given the run directory or a weights file in it."""
    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(f"config key 'pretrained': {path} does not exist")
    run_dir = _find_run_dir(path if path.is_dir() else path.parent)
    if run_dir is None:
        raise FileNotFoundError(f"config key 'pretrained': no {CONFIG_NAME} found in {path} or its parents")
    if (run_dir / MODEL_CONFIG_NAME).is_file():  # a fine-tuning run used as the starting point
        return _read_model_config(run_dir / MODEL_CONFIG_NAME)
    return load_config(PretrainConfig, run_dir / CONFIG_NAME).model


def _read_model_config(path: Path) -> ModelConfig:
    with open(path) as f:
        return from_dict(ModelConfig, yaml.safe_load(f) or {})


def build_classifier(model_cfg: ModelConfig, mode: str = "linear", pooling: str = "mean",
                     pretrained: str | Path | None = None) -> torch.nn.Module:
    """MultiLabelClassifier over a backbone built from `model_cfg`, with pretrained backbone weights if given."""
    from mmfuse_fast.models import MultiLabelClassifier, build_model

    if mode not in MODES:
        raise ValueError(f"config key 'mode' must be one of {MODES}, got {mode!r}")
    backbone = build_model(model_cfg)
    if pretrained:
        load_weights(backbone, pretrained)
    return MultiLabelClassifier(backbone, num_classes=NUM_CLASSES, pooling=pooling,
                                freeze_backbone=(mode == "linear"))


def _sample_ids(dataset: Dataset, indices: list[int]) -> list[str]:
    ids = getattr(dataset, "ids", None)
    if ids is not None:
        return [str(ids[i]) for i in indices]
    return [str(dataset[i].get("id", i)) for i in indices]


def draw_label_subset(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random subset of range(n) of size max(1, round(fraction * n)), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"config key 'label_fraction' must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(range(n))
    k = max(1, round(fraction * n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _label_subset(dataset: Dataset, cfg: FinetuneConfig, run_dir: Path, resuming: bool) -> list[int]:
    """Draws the label subset (checked against the saved one on resume); writes label_subset.json."""
    path = run_dir / LABEL_SUBSET_NAME
    indices = draw_label_subset(len(dataset), cfg.label_fraction, cfg.train.seed)
    if resuming and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("indices") != indices:
            raise CheckpointError(f"{path} holds a different label subset than the config draws; the training set "
                                  f"or label_fraction changed")
    record = {
        "label_fraction": cfg.label_fraction,
        "seed": cfg.train.seed,
        "splits": list(cfg.data.splits),
        "n_total": len(dataset),
        "n_selected": len(indices),
        "indices": indices,
        "ids": _sample_ids(dataset, indices),
    }
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return indices


def finetune_step(forward: Callable[[dict], torch.Tensor], batch: dict, optimizer: torch.optim.Optimizer,
                  grad_clip: float) -> dict[str, torch.Tensor]:
    """One step of BCE-with-logits training (`forward(batch) -> logits`); detached device scalars out, no host
    sync."""
    logits = forward(batch)
    loss = F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}


class FeatureCache(Dataset):
    """Pooled features of a frozen backbone, computed once: a linear probe then trains on them directly.

    The backbone is frozen, in eval mode and sees no augmentation, so every epoch would recompute exactly these
    features; caching them makes the probe's step a single Linear layer."""

    MAX_BYTES = 2 << 30

    def __init__(self, model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                 num_workers: int = 0, progress: bool = True):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        feats, labels = [], []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in tqdm(loader, desc="features (frozen backbone)", disable=not progress, dynamic_ncols=True):
                batch = to_device(batch, device)
                feats.append(model.features(batch).float().cpu())  # once, before training: not a per-step sync
                labels.append(batch["label"].cpu())
        model.train(was_training)
        self.features, self.labels = torch.cat(feats), torch.cat(labels)

    @staticmethod
    def fits(model: torch.nn.Module, n: int) -> bool:
        dim = model.head.in_features
        return n * dim * 4 <= FeatureCache.MAX_BYTES

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features[i], "label": self.labels[i]}


def finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, dataset: Dataset | None = None,
             eval_dataset: Dataset | None = None, progress: bool = True) -> dict:
    """Trains a multi-label classifier on `cfg.data.splits` (a `label_fraction` of it), then evaluates it on
    `cfg.eval_split` (skipped when empty). Returns run_dir, step, last training metrics, evaluation metrics."""
    from mmfuse_fast.data import build_dataset

    validate_config(cfg)
    run_dir, ckpt = prepare_run_dir(run_dir, resume)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    t_start = time.perf_counter()

    model_cfg = pretrained_model_config(cfg.pretrained) if cfg.pretrained else ModelConfig()
    pretrained = resolve_weights(cfg.pretrained) if cfg.pretrained and ckpt is None else None
    model = build_classifier(model_cfg, cfg.mode, cfg.pooling, pretrained).to(device)
    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.data.splits, bands=model_cfg.modalities)
    train_set = Subset(dataset, _label_subset(dataset, cfg, run_dir, ckpt is not None))
    optimizer = build_optimizer(model, cfg.optim, device)
    cfg_hash = config_hash(cfg)

    step = 0
    if ckpt is not None:
        step = restore_training_state(ckpt, model, optimizer, cfg_hash, {})["step"]
    truncate_metrics(run_dir, step)
    save_config(cfg, run_dir / CONFIG_NAME)
    atomic_write_text(run_dir / MODEL_CONFIG_NAME, yaml.safe_dump(to_dict(model_cfg), sort_keys=False))

    steps, batch_size = cfg.train.steps, cfg.train.batch_size
    if cfg.mode == "linear" and FeatureCache.fits(model, len(train_set)):
        train_set = FeatureCache(model, train_set, batch_size, device, cfg.data.num_workers, progress)
        forward, workers = (lambda b: model.head(b["features"])), 0
    else:
        forward, workers = model, cfg.data.num_workers
    loader = build_loader(train_set, batch_size, cfg.train.seed, start=step * batch_size, num_workers=workers,
                          device=device)
    batches = iter(loader)
    model.train()
    last_ckpt = ckpt
    logger = MetricLogger(run_dir, LoggingConfig(every=cfg.train.log_every, progress=progress), total_steps=steps,
                          start_step=step, desc=f"finetune ({cfg.mode})", batch_size=batch_size)
    with logger:
        while step < steps:
            batch = to_device(next(batches), device)
            lr = lr_at(step, cfg.optim, steps)
            set_lr(optimizer, lr)
            metrics = finetune_step(forward, batch, optimizer, cfg.optim.grad_clip)
            step += 1
            logger.accumulate(step, metrics)

            if logger.should_log(step) or step == steps:
                logger.log(step, {"lr": lr})
            if step % cfg.train.checkpoint_every == 0 or step == steps:
                logger.check_finite()
                state = training_state(step, optimizer, step * batch_size, cfg_hash, {})
                last_ckpt = save_checkpoint(run_dir, step, model, state)
        logger.check_finite()

    summary = {
        "run_dir": str(run_dir),
        "step": step,
        "metrics": logger.last,
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    if cfg.eval_split and last_ckpt is not None:
        from mmfuse_fast.engine.evaluate import evaluate

        summary["eval"] = evaluate(run_dir, split=cfg.eval_split, dataset=eval_dataset, progress=progress)
    return summary
