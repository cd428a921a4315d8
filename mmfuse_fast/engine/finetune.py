"""Downstream tasks on a pretrained run (the task table of engine/tasks.py: multilabel, scene, segmentation), each
as a linear probe (frozen backbone; for segmentation: frozen backbone, trained FPN head) or full fine-tuning,
through the same TrainStep and loop as pretraining (engine/loop.py).

A linear probe of a pooled head computes the frozen backbone's features once (FeatureCache) and trains the head on
them. Segmentation tiles larger than the model's img_size are randomly cropped for training (evaluation uses
sliding windows). The run directory's files are listed in engine/rundir.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mmfuse_fast.config import BaseModelConfig, FinetuneConfig, given_keys
from mmfuse_fast.data.loader import SharedBatchLoader
from mmfuse_fast.engine.checkpoint import config_hash, resolve_weights
from mmfuse_fast.engine.data import build_loader, to_device
from mmfuse_fast.engine.logging import truncate_metrics
from mmfuse_fast.engine.loop import Run, restore_training_state, run_loop
from mmfuse_fast.engine.optim import build_optimizer
from mmfuse_fast.engine.rundir import (LABEL_SUBSET_NAME, prepare_run_dir, read_backbone_config, write_json,
                                       write_run_configs, write_task_info)
from mmfuse_fast.engine.runtime import check_inputs, resolve_device, seed_everything, validate_config
from mmfuse_fast.engine.step import TrainStep
from mmfuse_fast.engine.tasks import TaskObjective, build_classifier, get_task
from mmfuse_fast.errors import CheckpointError, ConfigError, DataError
from mmfuse_fast.ops import check_backend_available

__all__ = ["finetune", "FeatureCache", "draw_label_subset", "backbone_config"]

# model keys a fine-tuning run may set on a pretrained backbone: they change how it runs, not what it is
RUNTIME_MODEL_KEYS = ("ops_backend",)


def backbone_config(cfg: FinetuneConfig) -> BaseModelConfig:
    """The backbone's model config: the pretrained run's (refusing any model key given that it fixes), or
    `cfg.model` when training from scratch."""
    if not cfg.pretrained:
        return cfg.model
    backbone = read_backbone_config(cfg.pretrained)
    for key in sorted(given_keys(cfg)):
        field = key.split(".")[1] if key.startswith("model.") else None
        if field is None or field in RUNTIME_MODEL_KEYS:
            continue
        if getattr(cfg.model, field, None) != getattr(backbone, field, None):
            raise ConfigError(f"config key '{key}' cannot apply: the backbone comes from the pretrained run "
                              f"{cfg.pretrained}, whose config fixes it ({field}: {getattr(backbone, field, None)!r}); "
                              f"only model.{', model.'.join(RUNTIME_MODEL_KEYS)} may be set")
    runtime = {k: getattr(cfg.model, k) for k in RUNTIME_MODEL_KEYS if f"model.{k}" in given_keys(cfg)}
    return dataclasses.replace(backbone, **runtime)


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
    write_json(path, record)
    return indices


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
        return n * model.head.in_features * 4 <= FeatureCache.MAX_BYTES

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
    model_cfg = backbone_config(cfg)
    cfg = dataclasses.replace(cfg, model=model_cfg)  # config.yaml records the backbone actually trained
    run_dir, ckpt = prepare_run_dir(run_dir, resume)
    device = resolve_device(cfg.train.device)
    check_backend_available(model_cfg.ops_backend, device)
    seed_everything(cfg.train.seed)
    task = get_task(cfg.task)

    pretrained = resolve_weights(cfg.pretrained) if cfg.pretrained and ckpt is None else None
    modalities = cfg.modalities or list(model_cfg.modalities)  # only these are read from the data
    unknown = [m for m in modalities if m not in model_cfg.modalities]
    if unknown:
        raise ConfigError(f"config key 'modalities' names {', '.join(map(repr, unknown))}, which the backbone "
                          f"was not {'pretrained' if cfg.pretrained else 'built'} on (it has "
                          f"{list(model_cfg.modalities)})")
    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.data.splits, bands={m: model_cfg.modalities[m] for m in modalities})
    info = _task_info(cfg, dataset)
    model = build_classifier(model_cfg, cfg.mode, cfg.pooling, pretrained, cfg.task, info["num_classes"],
                             cfg.seg_channels, modalities=cfg.modalities).to(device)
    check_inputs(model.backbone, dataset, larger_ok=cfg.task == "segmentation")
    train_set = Subset(dataset, _label_subset(dataset, cfg, run_dir, ckpt is not None))
    if cfg.task == "segmentation":
        train_set = RandomCrop(train_set, model_cfg.img_size, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim, device)
    cfg_hash = config_hash(cfg)

    step, engine_state = 0, {}
    if ckpt is not None:
        state = restore_training_state(ckpt, model, optimizer, cfg_hash, {})
        step, engine_state = state["step"], state.get("engine", {})
    truncate_metrics(run_dir, step)
    write_run_configs(run_dir, cfg, backbone=model_cfg)
    write_task_info(run_dir, info)

    batch_size = cfg.train.batch_size
    cached = task.pooled and cfg.mode == "linear" and FeatureCache.fits(model, len(train_set))
    if cached:
        train_set = FeatureCache(model, train_set, batch_size, device, cfg.data.num_workers, progress)
    objective = TaskObjective(model, task.loss(info["ignore_index"]), features=cached)
    loader = build_loader(train_set, batch_size, cfg.train.seed, start=step * batch_size,
                          num_workers=0 if cached else cfg.data.num_workers, device=device)
    step_fn = TrainStep(objective, optimizer, device=device, optim_cfg=cfg.optim, total_steps=cfg.train.steps,
                        amp=cfg.train.amp, max_bad_steps=cfg.train.max_bad_steps,
                        cuda_graph=cfg.train.cuda_graph, start_step=step)
    step_fn.load_state_dict(engine_state)
    objective.train()
    summary = run_loop(Run(run_dir=run_dir, model=model, optimizer=optimizer, step_fn=step_fn, batches=iter(loader),
                           train=cfg.train, optim_cfg=cfg.optim, cfg_hash=cfg_hash,
                           desc=f"finetune {cfg.task} ({cfg.mode})", start_step=step, last_checkpoint=ckpt,
                           progress=progress))
    if cfg.eval_split and summary["checkpoint"] is not None:
        from mmfuse_fast.engine.evaluate import evaluate

        summary["eval"] = evaluate(run_dir, split=cfg.eval_split, dataset=eval_dataset, progress=progress)
    return summary


def _task_info(cfg: FinetuneConfig, dataset: Dataset) -> dict:
    """What evaluate/predict need besides the weights: classes, ignore index, normalization statistics."""
    if cfg.task == "multilabel":
        from mmfuse_fast.data import BIGEARTHNET_CLASSES

        return {"task": "multilabel", "num_classes": len(BIGEARTHNET_CLASSES), "ignore_index": None,
                "classes": list(BIGEARTHNET_CLASSES), "stats": None}
    num_classes = getattr(dataset, "num_classes", None)
    if not num_classes:
        raise DataError(f"task {cfg.task!r} needs a dataset with `num_classes` (got {type(dataset).__name__})")
    dataset_task = getattr(dataset, "task", cfg.task)
    if dataset_task != cfg.task:
        raise ConfigError(f"config key 'task' is {cfg.task!r} but dataset {cfg.data.dataset!r} is a "
                          f"{dataset_task!r} dataset")
    stats_of = getattr(dataset, "normalization_stats", None)
    stats = stats_of() if callable(stats_of) else None
    return {"task": cfg.task, "num_classes": int(num_classes),
            "ignore_index": getattr(dataset, "ignore_index", 255 if cfg.task == "segmentation" else None),
            "classes": list(getattr(dataset, "classes", [])) or None,
            "stats": {m: {b: list(v) for b, v in s.items()} for m, s in stats.items()} if stats else None}
