"""Evaluation of a fine-tuned model on a whole split (metrics in mmfuse_fast.engine.metrics): multilabel (mAP,
F1), scene (top-1/top-3, weighted precision/recall/F1) or segmentation (mIoU, OA, mean F1 from one confusion
matrix over the split; rasters larger than the model input go through sliding-window inference)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mmfuse_fast.data.loader import SharedBatchLoader
from mmfuse_fast.engine.checkpoint import resolve_weights
from mmfuse_fast.engine.data import to_device
from mmfuse_fast.engine.rundir import eval_metrics_path, read_task_info, write_json
from mmfuse_fast.engine.runtime import resolve_device
from mmfuse_fast.engine.tasks import get_task, load_classifier

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(run_dir_or_checkpoint: str | Path, split: str = "test", data_root: str | None = None,
             dataset: Dataset | None = None, batch_size: int | None = None, progress: bool = True) -> dict:
    """Metrics of a fine-tuned model on `split`, computed over the whole split; also written to
    `metrics_<split>.json` in the run directory. multilabel: map_micro, map_macro, f1_samples (+ per-class AP);
    scene: top1, top3, precision, recall, f1 (weighted); segmentation: miou, oa, mean_f1 (+ per-class IoU/F1)."""
    from mmfuse_fast.data import BIGEARTHNET_CLASSES, build_dataset

    t0 = time.perf_counter()
    model, run_dir, cfg = load_classifier(run_dir_or_checkpoint, "cpu")
    device = resolve_device(cfg.train.device)
    model.to(device)
    data_cfg = cfg.data
    if data_root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=str(data_root))
    built = dataset is None  # else the caller's dataset: its class and root (if any) are recorded
    if built:
        dataset = build_dataset(data_cfg, [split], bands={m: model.backbone.bands[m] for m in model.modalities})
    loader = SharedBatchLoader(dataset, batch_size or cfg.train.batch_size, num_workers=cfg.data.num_workers,
                               pin_memory=device.type == "cuda")
    info = read_task_info(run_dir)
    task, num_classes = info["task"], info["num_classes"]
    metrics = get_task(task).metrics(num_classes, info["ignore_index"])
    if task == "segmentation":
        from mmfuse_fast.models.segmentation import sliding_window_logits

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
    result = {"split": split, **result, "dataset": data_cfg.dataset if built else type(dataset).__name__,
              "data_root": str(getattr(dataset, "root", data_cfg.root if built else "")) or None,
              "modalities": list(model.modalities),
              "checkpoint": str(resolve_weights(run_dir_or_checkpoint)), "wall_s": round(time.perf_counter() - t0, 3)}
    write_json(eval_metrics_path(run_dir, split), result)
    return result

