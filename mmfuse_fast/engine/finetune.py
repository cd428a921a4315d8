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
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from mmfuse_fast.config import BaseModelConfig, FinetuneConfig, given_keys
from mmfuse_fast.data.loader import SharedBatchLoader
from mmfuse_fast.engine.checkpoint import config_hash, hashed_config_values, resolve_weights
from mmfuse_fast.engine.data import build_loader, to_device
from mmfuse_fast.engine.logging import truncate_metrics
from mmfuse_fast.engine.loop import Run, restore_training_state, run_loop
from mmfuse_fast.engine.optim import build_optimizer
from mmfuse_fast.engine.rundir import (LABEL_SUBSET_NAME, RunDirLock, prepare_run_dir, read_backbone_config,
                                       write_json, write_run_configs, write_task_info)
from mmfuse_fast.engine.runtime import (check_inputs, resolve_device, seed_everything, validate_config,
                                        with_declared_bands)
from mmfuse_fast.engine.step import TrainStep
from mmfuse_fast.engine.tasks import TaskObjective, build_classifier, get_task
from mmfuse_fast.errors import CheckpointError, ConfigError, DataError
from mmfuse_fast.models.layers import set_drop_path
from mmfuse_fast.ops import check_backend_available

__all__ = ["finetune", "FeatureCache", "draw_label_subset", "iterative_stratification", "per_class_subset",
           "dataset_labels", "backbone_config"]

# model keys a fine-tuning run may set on a pretrained backbone: they change how it runs, not what it is
RUNTIME_MODEL_KEYS = ("ops_backend",)


def backbone_config(cfg: FinetuneConfig) -> BaseModelConfig:
    """The backbone's model config: the pretrained run's (refusing any model key given that it fixes), or
    `cfg.model` when training from scratch."""
    if not cfg.pretrained:
        return with_declared_bands(cfg).model
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


LABEL_SUBSET_METHODS = {"multilabel": "iterative_stratification", "scene": "per_class", "segmentation": "random"}


def draw_label_subset(n: int, fraction: float, seed: int, labels: np.ndarray | None = None,
                      method: str = "random") -> list[int]:
    """The `label_fraction` draw: k = max(1, round(fraction * n)) indices of range(n), sorted, a pure function of
    (labels, fraction, seed). `fraction == 1` keeps everything.

    method "iterative_stratification": `labels` (n, C) 0/1 (multi-label); "per_class": `labels` (n,) class ids
    (single label); "random": a seeded random subset (labels unused). The stratified draws keep at least one
    positive of every class present in `labels` unless k is too small to hold them all."""
    if not 0 < fraction <= 1:
        raise ValueError(f"config key 'label_fraction' must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(range(n))
    k = max(1, round(fraction * n))
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n, generator=g)[:k].tolist())
    if labels is None or len(labels) != n:
        raise ValueError(f"method {method!r} needs the labels of all {n} samples")
    if method == "iterative_stratification":
        return sorted(iterative_stratification(np.asarray(labels), k, seed).tolist())
    if method == "per_class":
        return sorted(per_class_subset(np.asarray(labels), k, seed).tolist())
    raise ValueError(f"unknown label subset method {method!r}; expected one of "
                     f"{sorted(set(LABEL_SUBSET_METHODS.values()))}")


def iterative_stratification(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k indices of a multi-label set (`labels` (n, C), nonzero = positive) by iterative stratification (Sechidis,
    Tsoumakas & Vlahavas 2011, ECML-PKDD; scikit-multilearn's IterativeStratification) into two folds, the subset
    (proportion r = k / n) and the rest, after a cover that gives every present class a positive in the subset.

    1. Cover: rarest class first, a class not yet covered takes its sample covering most uncovered classes (a
       greedy set cover; the first k picks if it needs more than k).
    2. Sechidis: rarest class first (among the classes with unassigned positives; ties at random), each of its
       unassigned samples goes to the fold that most desires that class (ties: the fold desiring most samples, then
       random), and the desired counts of the sample's classes drop by one (the cover's samples count for the
       subset). Samples without a positive go to the fold desiring most samples.
    3. The folds' sizes are only approximately r * n: a greedy pass drops from the subset (never a cover sample) or
       adds to it, one sample at a time, the one that least increases the squared error of the per-class
       proportions sum_l ((count_l - r * positives_l) / positives_l)**2, until it holds exactly k.
    Deterministic in `seed` (numpy's PCG64)."""
    y = np.asarray(labels) != 0
    n, c = y.shape
    if not 1 <= k <= n:
        raise ValueError(f"subset size must be in [1, {n}]; got {k}")
    rng = np.random.default_rng(seed)
    positives = y.sum(0)
    target = (k / n) * positives  # each class's proportional share of the subset
    order = rng.permutation(n)  # the order samples are visited in (and the final tie-breaker)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    members = [order[y[order, j]] for j in range(c)]  # each class's samples, in visiting order

    # 1. the cover
    covered, cover = np.zeros(c, dtype=bool), []
    for label in np.lexsort((np.arange(c), positives)):
        if positives[label] == 0 or covered[label]:
            continue
        candidates = members[label]
        pick = int(candidates[np.argmax(y[candidates][:, ~covered].sum(1))])  # first best in visiting order
        cover.append(pick)
        covered |= y[pick]
    cover = np.asarray(cover[:k], dtype=np.int64)

    # 2. iterative stratification of the rest
    fold = np.full(n, -1, dtype=np.int64)
    fold[cover] = 0
    desired = np.stack([target - y[cover].sum(0), positives - target])  # (fold, class): subset, rest
    desired_total = np.array([k - len(cover), n - k], dtype=np.float64)
    remaining = positives - y[cover].sum(0)  # unassigned positives per class

    def choose(scores: np.ndarray) -> int:
        best = np.flatnonzero(scores == scores.max())
        return int(best[0]) if len(best) == 1 else int(rng.choice(best))

    def fold_by_size() -> int:
        if desired_total[0] == desired_total[1]:
            return int(rng.integers(2))
        return int(desired_total[1] > desired_total[0])

    while (remaining > 0).any():
        label = choose(-np.where(remaining > 0, remaining, np.iinfo(np.int64).max))
        for i in members[label]:
            if fold[i] >= 0:
                continue
            d = desired[:, label]
            j = int(d[1] > d[0]) if d[0] != d[1] else fold_by_size()
            fold[i] = j
            classes = y[i]
            desired[j, classes] -= 1
            desired_total[j] -= 1
            remaining[classes] -= 1
    for i in order[fold[order] < 0]:  # samples without a positive label
        j = fold_by_size()
        fold[i] = j
        desired_total[j] -= 1

    # 3. exactly k
    chosen = fold == 0
    protected = np.zeros(n, dtype=bool)
    protected[cover] = True
    count = y[chosen].sum(0).astype(np.float64)
    weight = 1.0 / np.maximum(positives, 1).astype(np.float64) ** 2  # squared error of proportions, per class
    while chosen.sum() > k:
        idx = np.flatnonzero(chosen & ~protected)
        harm = y[idx] @ (weight * (1.0 - 2.0 * (count - target)))  # change of the error when dropped
        pick = idx[np.lexsort((rank[idx], harm))[0]]
        chosen[pick] = False
        count -= y[pick]
    while chosen.sum() < k:
        idx = np.flatnonzero(~chosen)
        yi = y[idx]
        gained = (yi & (count == 0)).sum(1)  # classes a truncated cover left out come first
        harm = yi @ (weight * (1.0 + 2.0 * (count - target)))  # change of the error when added
        pick = idx[np.lexsort((rank[idx], harm, -gained))[0]]
        chosen[pick] = True
        count += y[pick]
    return np.flatnonzero(chosen)


def per_class_subset(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k indices of a single-label set (`labels` (n,) class ids), drawn per class: each present class gets its
    proportional share k * n_c / n rounded down, at least one sample (when k covers every present class; else the
    k largest classes get one each), the rest of k going to the largest remainders; within a class the samples are
    a seeded random draw. Deterministic in `seed`."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    n = len(labels)
    if not 1 <= k <= n:
        raise ValueError(f"subset size must be in [1, {n}]; got {k}")
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    tiebreak = rng.permutation(len(classes))
    quota = k * sizes / n
    if k < len(classes):  # not every class can have a sample: the largest ones do
        take = np.zeros(len(classes), dtype=np.int64)
        take[np.lexsort((tiebreak, -sizes))[:k]] = 1
    else:
        take = np.minimum(np.maximum(np.floor(quota).astype(np.int64), 1), sizes)
        while take.sum() > k:  # the floor-at-one overshoots: take from the classes furthest above their quota
            room = np.where(take > 1, take - quota, -np.inf)
            take[np.lexsort((tiebreak, -room))[0]] -= 1
        while take.sum() < k:  # largest remainders first
            room = np.where(take < sizes, quota - take, -np.inf)
            take[np.lexsort((tiebreak, -room))[0]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == cls))[:t] for cls, t in zip(classes, take)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def dataset_labels(dataset: Dataset, task: str, decode: bool = True) -> np.ndarray | None:
    """The labels of every sample without decoding images where the dataset can give them: its `labels` array
    (BigEarthNet readers: (n, 19) from the metadata; scene packs: (n,) from the metadata), through a Subset;
    otherwise `dataset[i]["label"]` for every sample (None instead with `decode=False`). Multi-label -> (n, C)
    bool, scene -> (n,) int64."""

    def cheap(ds):
        labels = getattr(ds, "labels", None)
        if labels is not None and len(labels) == len(ds):
            return np.asarray(labels)
        if isinstance(ds, Subset):
            inner = cheap(ds.dataset)
            return None if inner is None else inner[np.asarray(ds.indices, dtype=np.int64)]
        return None

    labels = cheap(dataset)
    if labels is None and not decode:
        return None
    if labels is None:
        labels = np.stack([np.asarray(dataset[i]["label"]) for i in range(len(dataset))]) if len(dataset) else None
    if task == "multilabel":
        return np.asarray(labels).reshape(len(dataset), -1) != 0
    return np.asarray(labels).reshape(len(dataset)).astype(np.int64)


def _class_counts(labels: np.ndarray, task: str, num_classes: int) -> list[int]:
    if task == "multilabel":
        counts = labels.sum(0)
    else:
        valid = labels[(labels >= 0) & (labels < num_classes)]
        counts = np.bincount(valid, minlength=num_classes)
    return [int(v) for v in counts]


def _label_subset(dataset: Dataset, cfg: FinetuneConfig, run_dir: Path, resuming: bool, info: dict) -> list[int]:
    """Draws the label subset (checked against the saved one on resume); writes label_subset.json.

    Multi-label tasks draw by iterative stratification and scene tasks per class, both over labels read without
    decoding images (`dataset_labels`); segmentation draws a plain seeded random subset: which classes a tile holds
    is known only by reading its whole label raster, and every tile holds several classes, so tiles are not
    stratified (the record then has no class counts)."""
    path = run_dir / LABEL_SUBSET_NAME
    method = LABEL_SUBSET_METHODS[cfg.task]
    # all kept: no draw, class counts only where the labels come without reading samples
    labels = dataset_labels(dataset, cfg.task, decode=cfg.label_fraction < 1) if method != "random" else None
    indices = draw_label_subset(len(dataset), cfg.label_fraction, cfg.label_seed, labels, method)
    if resuming and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("indices") != indices:
            raise CheckpointError(f"{path} holds a different label subset than the config draws; the training set, "
                                  f"label_fraction or label_seed changed")
    record = {
        "label_fraction": cfg.label_fraction,
        "label_seed": cfg.label_seed,
        "method": method,
        "splits": list(cfg.data.splits),
        "n_total": len(dataset),
        "n_selected": len(indices),
    }
    if labels is not None:
        classes = info.get("classes") or [str(i) for i in range(info["num_classes"])]
        full = _class_counts(labels, cfg.task, info["num_classes"])
        sub = _class_counts(labels[indices], cfg.task, info["num_classes"])
        missing = [name for name, a, b in zip(classes, full, sub) if a > 0 and b == 0]
        if missing:
            warnings.warn(f"the label subset ({len(indices)} samples, label_fraction={cfg.label_fraction}) has no "
                          f"positive of class(es) {missing}: too few samples to cover every class", stacklevel=2)
        record["class_counts"] = {"classes": list(classes), "full": full, "subset": sub}
        record["missing_classes"] = missing
    record.update(indices=indices, ids=_sample_ids(dataset, indices))
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
    `cfg.eval_split` (skipped when empty). Returns run_dir, step, last training metrics, evaluation metrics. The
    run directory is held (engine/rundir.py's RunDirLock) until the run ends."""
    validate_config(cfg)
    model_cfg = backbone_config(cfg)
    cfg = dataclasses.replace(cfg, model=model_cfg)  # config.yaml records the backbone actually trained
    with RunDirLock(run_dir):
        return _finetune(cfg, model_cfg, run_dir, resume, dataset, eval_dataset, progress)


def _finetune(cfg: FinetuneConfig, model_cfg: BaseModelConfig, run_dir, resume: bool, dataset, eval_dataset,
              progress: bool) -> dict:
    from mmfuse_fast.data import build_dataset

    run_dir, resumed = prepare_run_dir(run_dir, resume)
    device = resolve_device(cfg.train.device)
    check_backend_available(model_cfg.ops_backend, device)
    seed_everything(cfg.train.seed)
    task = get_task(cfg.task)

    pretrained = resolve_weights(cfg.pretrained) if cfg.pretrained and resumed is None else None
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
    train_set = Subset(dataset, _label_subset(dataset, cfg, run_dir, resumed is not None, info))
    if cfg.task == "segmentation":
        train_set = RandomCrop(train_set, model_cfg.img_size, cfg.train.seed)
    if cfg.mode == "full":  # the fine-tuning recipe (configs/finetune_full.yaml); a frozen backbone has no use for it
        set_drop_path(model.backbone, cfg.drop_path)
    optimizer = build_optimizer(model, cfg.optim, device, layer_decay=cfg.layer_decay if cfg.mode == "full" else 1.0)
    cfg_hash = config_hash(cfg)

    step, engine_state, last_checkpoint = 0, {}, None
    if resumed is not None:
        state = restore_training_state(resumed, model, optimizer, cfg, {})
        step, engine_state, last_checkpoint = state["step"], state.get("engine", {}), resumed.path
        del resumed  # its weights are in the model now: the host copy is not kept for the whole run
    truncate_metrics(run_dir, step)
    write_run_configs(run_dir, cfg, backbone=model_cfg)
    write_task_info(run_dir, info)

    batch_size = cfg.train.batch_size
    cached = task.pooled and cfg.mode == "linear" and FeatureCache.fits(model, len(train_set))
    samples = train_set  # what the readers' skipped samples are counted on (not the feature cache made of it)
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
                           config_values=hashed_config_values(cfg), train_set=samples,
                           desc=f"finetune {cfg.task} ({cfg.mode})", start_step=step,
                           last_checkpoint=last_checkpoint, progress=progress))
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
            # class k is label value k + 1 in the dataset's files when label 0 (background) was left out
            "label_offset": int(bool(getattr(dataset, "reduce_zero_label", False))),
            "stats": {m: {b: list(v) for b, v in s.items()} for m, s in stats.items()} if stats else None}
