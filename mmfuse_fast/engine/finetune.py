"""Downstream tasks on a pretrained run: multi-label classification (BigEarthNet), single-label scene
classification (SEN12MS) and semantic segmentation (segmentation tiles), each as a linear probe (frozen encoder;
for segmentation: frozen encoder, trained FPN head) or full fine-tuning.

Losses: multilabel BCE-with-logits; scene cross-entropy; segmentation per-pixel cross-entropy with the dataset's
ignore index. Segmentation tiles larger than the model's img_size are randomly cropped for training (evaluation
uses sliding windows).

A fine-tuning run directory holds::

    config.yaml           the resolved FinetuneConfig
    model.yaml            the backbone's ModelConfig (what evaluate needs to rebuild the classifier)
    label_subset.json     the training samples drawn for cfg.label_fraction (indices into the training set + ids)
    task.json             task, num_classes, ignore_index, class names and the normalization statistics (by band)
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
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mmfuse_fast.config import FinetuneConfig, ModelConfig, PretrainConfig, from_dict, load_config, save_config, to_dict
from mmfuse_fast.data.loader import SharedBatchLoader
from mmfuse_fast.engine.checkpoint import (CheckpointError, atomic_write_text, config_hash, load_weights,
                                           resolve_weights, save_checkpoint)
from mmfuse_fast.engine.data import build_loader, to_device
from mmfuse_fast.engine.logging import LoggingConfig, MetricLogger, truncate_metrics
from mmfuse_fast.engine.optim import backward_and_step, build_optimizer, lr_at, set_lr
from mmfuse_fast.engine.pretrain import CONFIG_NAME, restore_training_state, training_state
from mmfuse_fast.engine.runtime import prepare_run_dir, resolve_device, seed_everything, validate_config

__all__ = ["finetune", "finetune_step", "FeatureCache", "build_classifier", "pretrained_model_config", "draw_label_subset",
           "MODEL_CONFIG_NAME", "LABEL_SUBSET_NAME", "TASK_NAME", "TASKS", "task_loss", "read_task_info"]

MODEL_CONFIG_NAME = "model.yaml"
LABEL_SUBSET_NAME = "label_subset.json"
TASK_NAME = "task.json"
NUM_CLASSES = 19
MODES = ("linear", "full")
TASKS = ("multilabel", "scene", "segmentation")


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
                     pretrained: str | Path | None = None, task: str = "multilabel", num_classes: int = NUM_CLASSES,
                     seg_channels: int = 64) -> torch.nn.Module:
    """The task's model over a backbone built from `model_cfg`, with pretrained backbone weights if given:
    a pooled Linear head (multilabel, scene) or a SegmentationModel (segmentation)."""
    from mmfuse_fast.models import MultiLabelClassifier, build_model
    from mmfuse_fast.models.segmentation import SegmentationModel

    if mode not in MODES:
        raise ValueError(f"config key 'mode' must be one of {MODES}, got {mode!r}")
    if task not in TASKS:
        raise ValueError(f"config key 'task' must be one of {TASKS}, got {task!r}")
    backbone = build_model(model_cfg)
    if pretrained:
        load_weights(backbone, pretrained)
    if task == "segmentation":
        return SegmentationModel(backbone, num_classes, channels=seg_channels, freeze_backbone=(mode == "linear"))
    return MultiLabelClassifier(backbone, num_classes=num_classes, pooling=pooling,
                                freeze_backbone=(mode == "linear"))


def task_loss(task: str, ignore_index: int = 255) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "multilabel":
        return lambda logits, label: F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype))
    if task == "scene":
        return lambda logits, label: F.cross_entropy(logits, label.long().reshape(-1))

    def segmentation_loss(logits, label):  # mean over labelled pixels; 0 (not NaN) for an all-ignored batch
        label = label.long()
        total = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="sum")
        return total / (label != ignore_index).sum().clamp_min(1)

    return segmentation_loss


def read_task_info(run_dir: str | Path) -> dict:
    """task.json of a fine-tuning run; runs from before it existed are multilabel BigEarthNet runs."""
    path = Path(run_dir) / TASK_NAME
    if not path.is_file():
        return {"task": "multilabel", "num_classes": NUM_CLASSES, "ignore_index": None, "classes": None,
                "stats": None}
    return json.loads(path.read_text())


class RandomCrop(Dataset):
    """Segmentation training samples cropped to size x size at a position drawn from (seed, index, draw)."""

    def __init__(self, dataset: Dataset, size: int, seed: int):
        self.dataset, self.size, self.seed, self.draws = dataset, size, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        h, w = sample["label"].shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"sample {sample.get('id', i)} is {h}x{w}, smaller than model.img_size={self.size}")
        self.draws += 1
        g = torch.Generator().manual_seed(hash((self.seed, i, self.draws)) % 2**62)
        y = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
        x = int(torch.randint(0, w - self.size + 1, (1,), generator=g))
        return {k: (v[..., y:y + self.size, x:x + self.size] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v)
                for k, v in sample.items()}


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
                  grad_clip: float, loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """One training step (`forward(batch) -> logits`, `loss_fn(logits, label)`, default BCE-with-logits);
    detached device scalars out, no host sync."""
    logits = forward(batch)
    loss = (loss_fn or task_loss("multilabel"))(logits, batch["label"])
    grad_norm = backward_and_step(loss, optimizer, grad_clip)
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}


class FeatureCache(Dataset):
    """Pooled features of a frozen backbone, computed once: a linear probe then trains on them directly.

    The backbone is frozen, in eval mode and sees no augmentation, so every epoch would recompute exactly these
    features; caching them makes the probe's step a single Linear layer."""

    MAX_BYTES = 2 << 30

    def __init__(self, model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                 num_workers: int = 0, progress: bool = True):
        loader = SharedBatchLoader(dataset, batch_size, num_workers=num_workers)
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
    """Trains the `cfg.task` model on `cfg.data.splits` (a `label_fraction` of it), then evaluates it on
    `cfg.eval_split` (skipped when empty). Returns run_dir, step, last training metrics, evaluation metrics."""
    from mmfuse_fast.data import build_dataset

    validate_config(cfg)
    run_dir, ckpt = prepare_run_dir(run_dir, resume)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    t_start = time.perf_counter()

    model_cfg = pretrained_model_config(cfg.pretrained) if cfg.pretrained else cfg.model
    pretrained = resolve_weights(cfg.pretrained) if cfg.pretrained and ckpt is None else None
    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.data.splits, bands=model_cfg.modalities)
    task_info = _task_info(cfg, dataset)
    model = build_classifier(model_cfg, cfg.mode, cfg.pooling, pretrained, cfg.task, task_info["num_classes"],
                             cfg.seg_channels).to(device)
    loss_fn = task_loss(cfg.task, task_info["ignore_index"] if task_info["ignore_index"] is not None else -100)
    train_set = Subset(dataset, _label_subset(dataset, cfg, run_dir, ckpt is not None))
    if cfg.task == "segmentation":
        train_set = RandomCrop(train_set, model_cfg.img_size, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim, device)
    cfg_hash = config_hash(cfg)

    step = 0
    if ckpt is not None:
        step = restore_training_state(ckpt, model, optimizer, cfg_hash, {})["step"]
    truncate_metrics(run_dir, step)
    save_config(cfg, run_dir / CONFIG_NAME)
    atomic_write_text(run_dir / MODEL_CONFIG_NAME, yaml.safe_dump(to_dict(model_cfg), sort_keys=False))
    atomic_write_text(run_dir / TASK_NAME, json.dumps(task_info, indent=1) + "\n")

    steps, batch_size = cfg.train.steps, cfg.train.batch_size
    if cfg.task != "segmentation" and cfg.mode == "linear" and FeatureCache.fits(model, len(train_set)):
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
            metrics = finetune_step(forward, batch, optimizer, cfg.optim.grad_clip, loss_fn)
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


def _task_info(cfg: FinetuneConfig, dataset: Dataset) -> dict:
    """What evaluate/predict need besides the weights: classes, ignore index, normalization statistics."""
    if cfg.task == "multilabel":
        from mmfuse_fast.data import BIGEARTHNET_CLASSES

        return {"task": "multilabel", "num_classes": NUM_CLASSES, "ignore_index": None,
                "classes": list(BIGEARTHNET_CLASSES), "stats": None}
    num_classes = getattr(dataset, "num_classes", None)
    if not num_classes:
        raise ValueError(f"task {cfg.task!r} needs a dataset with `num_classes` (got {type(dataset).__name__})")
    dataset_task = getattr(dataset, "task", cfg.task)
    if dataset_task != cfg.task:
        raise ValueError(f"config key 'task' is {cfg.task!r} but dataset {cfg.data.dataset!r} is a "
                         f"{dataset_task!r} dataset")
    if getattr(dataset, "normalize", False) and hasattr(dataset, "_ensure_stats") and dataset._mean_std is None:
        dataset._ensure_stats()
    stats = getattr(dataset, "stats", None)
    return {"task": cfg.task, "num_classes": int(num_classes),
            "ignore_index": getattr(dataset, "ignore_index", 255 if cfg.task == "segmentation" else None),
            "classes": list(getattr(dataset, "classes", [])) or None,
            "stats": {m: {b: list(v) for b, v in s.items()} for m, s in stats.items()} if stats else None}
