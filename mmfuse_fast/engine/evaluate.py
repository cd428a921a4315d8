"""Evaluation of a fine-tuned model on a whole split (metrics in mmfuse_fast.engine.metrics): multilabel (mAP,
F1), scene (top-1/top-3, weighted precision/recall/F1) or segmentation (mIoU, OA, mean F1 from one confusion
matrix over the split; rasters larger than the model input go through sliding-window inference)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mmfuse_fast.config import FinetuneConfig, load_config
from mmfuse_fast.data.loader import SharedBatchLoader
from mmfuse_fast.engine.checkpoint import CheckpointError, atomic_write_text, load_weights, resolve_weights
from mmfuse_fast.engine.data import to_device
from mmfuse_fast.engine.finetune import (MODEL_CONFIG_NAME, _find_run_dir, _read_model_config, build_classifier,
                                         read_task_info)
from mmfuse_fast.engine.metrics import MultiLabelMetrics, SceneMetrics, SegmentationMetrics
from mmfuse_fast.engine.pretrain import CONFIG_NAME
from mmfuse_fast.engine.runtime import resolve_device

__all__ = ["evaluate", "load_classifier"]


def load_classifier(run_dir_or_checkpoint: str | Path, device: str | torch.device = "cpu"):
    """Rebuilds a fine-tuned classifier from its run directory (latest checkpoint), a checkpoint directory or a
    model.safetensors in it; returns (model in eval mode, run_dir, FinetuneConfig)."""
    path = Path(run_dir_or_checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    run_dir = _find_run_dir(path if path.is_dir() else path.parent)
    if run_dir is None or not (run_dir / MODEL_CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path} is not a fine-tuning run (no {CONFIG_NAME} + {MODEL_CONFIG_NAME} found); evaluate needs the "
            f"output of `mmfuse finetune`"
        )
    cfg = load_config(FinetuneConfig, run_dir / CONFIG_NAME)
    info = read_task_info(run_dir)
    model = build_classifier(_read_model_config(run_dir / MODEL_CONFIG_NAME), cfg.mode, cfg.pooling,
                             task=info["task"], num_classes=info["num_classes"], seg_channels=cfg.seg_channels)
    load_weights(model, resolve_weights(path))
    return model.to(device).eval(), run_dir, cfg


@torch.no_grad()
def evaluate(run_dir_or_checkpoint: str | Path, split: str = "test", data_root: str | None = None,
             dataset: Dataset | None = None, batch_size: int | None = None, progress: bool = True) -> dict:
    """Metrics of a fine-tuned model on `split`, computed over the whole split; also written to
    `metrics_<split>.json` in the run directory. multilabel: map_micro, map_macro, f1_samples (+ per-class AP);
    scene: top1, top3, precision, recall, f1 (weighted); segmentation: miou, oa, mean_f1 (+ per-class IoU/F1)."""
    from mmfuse_fast.data import BIGEARTHNET_CLASSES, build_dataset

    t0 = time.perf_counter()
    probe_device = "cpu"
    model, run_dir, cfg = load_classifier(run_dir_or_checkpoint, probe_device)
    device = resolve_device(cfg.train.device)
    model.to(device)
    if dataset is None:
        data_cfg = cfg.data
        if data_root is not None:
            data_cfg = type(data_cfg)(**{**vars(data_cfg), "root": str(data_root)})
        dataset = build_dataset(data_cfg, [split], bands=model.backbone.cfg.modalities)
    loader = SharedBatchLoader(dataset, batch_size or cfg.train.batch_size, num_workers=cfg.data.num_workers,
                               pin_memory=device.type == "cuda")
    info = read_task_info(run_dir)
    task, num_classes = info["task"], info["num_classes"]
    if task == "multilabel":
        metrics = MultiLabelMetrics()
    elif task == "scene":
        metrics = SceneMetrics(num_classes)
    else:
        from mmfuse_fast.models.segmentation import sliding_window_logits

        metrics = SegmentationMetrics(num_classes, info["ignore_index"])
        window = model.img_size
        stride = cfg.eval_stride or None
    for batch in tqdm(loader, desc=f"evaluate {split}", disable=not progress, dynamic_ncols=True):
        batch = to_device(batch, device)
        if task == "segmentation":
            images = {m: batch[m] for m in model.modalities}
            logits = sliding_window_logits(model, images, window, num_classes, stride)
            metrics.update(logits, batch["label"])
        else:
            metrics.update(model(batch), batch["label"])
    result = metrics.compute()
    classes = list(info.get("classes") or (BIGEARTHNET_CLASSES if task == "multilabel" else range(num_classes)))
    classes = [str(c) for c in classes]
    for key in ("ap_per_class", "iou_per_class", "f1_per_class"):
        if key in result:
            result[key] = {c: a for c, a in zip(classes, result[key])}
    result["task"] = task
    result = {"split": split, **result, "checkpoint": str(resolve_weights(run_dir_or_checkpoint)),
              "wall_s": round(time.perf_counter() - t0, 3)}
    atomic_write_text(Path(run_dir) / f"metrics_{split}.json", json.dumps(_jsonable(result), indent=1) + "\n")
    return result


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and v != v:
        return None  # NaN (e.g. AP of a class without positives) -> null
    return v
