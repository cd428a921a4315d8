"""The downstream task table and the task models built from it.

    TASKS[name] -> Task(head, loss, metrics): multilabel (BigEarthNet: pooled Linear head, BCE, mAP/F1),
                   scene (SEN12MS: pooled Linear head, cross-entropy, top-k and weighted P/R/F1),
                   segmentation (FPN head, per-pixel cross-entropy with an ignore index, mIoU/OA/mF1)

`build_classifier` puts a task's head on a backbone (models/contract.py), `load_classifier` rebuilds a fine-tuned
one from its run directory, and `TaskObjective` gives a task model the pretraining contract, so fine-tuning runs
through the same TrainStep and loop as pretraining.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfuse_fast.config import BaseModelConfig, FinetuneConfig, load_config
from mmfuse_fast.engine.checkpoint import load_weights, resolve_weights
from mmfuse_fast.engine.metrics import MultiLabelMetrics, SceneMetrics, SegmentationMetrics
from mmfuse_fast.engine.rundir import CONFIG_NAME, MODEL_CONFIG_NAME, find_run_dir, read_backbone_config, read_task_info
from mmfuse_fast.errors import CheckpointError, ConfigError

__all__ = ["Task", "TASKS", "MODES", "get_task", "build_classifier", "load_classifier", "TaskObjective"]

MODES = ("linear", "full")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _multilabel_loss(ignore_index: int | None) -> LossFn:
    return lambda logits, label: F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype))


def _scene_loss(ignore_index: int | None) -> LossFn:
    return lambda logits, label: F.cross_entropy(logits, label.long().reshape(-1))


def _segmentation_loss(ignore_index: int | None) -> LossFn:
    ignore = -100 if ignore_index is None else ignore_index

    def loss(logits, label):  # mean over labelled pixels; 0 (not NaN) for an all-ignored batch
        label = label.long()
        total = F.cross_entropy(logits.float(), label, ignore_index=ignore, reduction="sum")
        return total / (label != ignore).sum().clamp_min(1)

    return loss


def _pooled_head(backbone, num_classes: int, modalities, cfg_pooling: str, seg_channels: int, frozen: bool):
    from mmfuse_fast.models import MultiLabelClassifier

    return MultiLabelClassifier(backbone, num_classes=num_classes, modalities=modalities, pooling=cfg_pooling,
                                freeze_backbone=frozen)


def _segmentation_head(backbone, num_classes: int, modalities, cfg_pooling: str, seg_channels: int, frozen: bool):
    from mmfuse_fast.models.segmentation import SegmentationModel

    return SegmentationModel(backbone, num_classes, modalities=modalities, channels=seg_channels,
                             freeze_backbone=frozen)


@dataclass(frozen=True)
class Task:
    name: str
    pooled: bool  # a head on pooled features: a frozen backbone's features can be computed once
    head: Callable[..., nn.Module]  # (backbone, num_classes, modalities, pooling, seg_channels, frozen)
    loss: Callable[[int | None], LossFn]  # ignore_index -> loss(logits, label)
    metrics: Callable[[int, int | None], object]  # (num_classes, ignore_index) -> accumulator


TASKS: dict[str, Task] = {
    "multilabel": Task("multilabel", True, _pooled_head, _multilabel_loss, lambda n, ignore: MultiLabelMetrics()),
    "scene": Task("scene", True, _pooled_head, _scene_loss, lambda n, ignore: SceneMetrics(n)),
    "segmentation": Task("segmentation", False, _segmentation_head, _segmentation_loss,
                         lambda n, ignore: SegmentationMetrics(n, 255 if ignore is None else ignore)),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"config key 'task' must be one of {', '.join(TASKS)}; got {name!r}")
    return TASKS[name]


def build_classifier(model_cfg: BaseModelConfig, mode: str = "linear", pooling: str = "mean",
                     pretrained: str | Path | None = None, task: str = "multilabel", num_classes: int = 19,
                     seg_channels: int = 64, modalities: Sequence[str] | None = None) -> nn.Module:
    """The task's model over a backbone built from `model_cfg` (with pretrained backbone weights if given), on
    `modalities` (default: all the backbone has). The backbone is the model's `downstream_backbone()` (e.g.
    DINO-MM's teacher encoder) where it defines one."""
    from mmfuse_fast.models import build_model
    from mmfuse_fast.models.contract import chosen_modalities, downstream_backbone

    if mode not in MODES:
        raise ConfigError(f"config key 'mode' must be one of {', '.join(MODES)}; got {mode!r}")
    spec = get_task(task)
    model = build_model(model_cfg)
    if modalities:
        try:
            chosen_modalities(model, modalities)
        except ValueError as e:
            raise ConfigError(f"config key 'modalities': {e}") from None
    if pretrained:
        load_weights(model, pretrained)
    backbone = downstream_backbone(model)
    return spec.head(backbone, num_classes, modalities or None, pooling, seg_channels, mode == "linear")


def load_classifier(run_dir_or_checkpoint: str | Path, device: str | torch.device = "cpu"):
    """Rebuilds a fine-tuned classifier from its run directory (latest checkpoint), a checkpoint directory or a
    model.safetensors in it; returns (model in eval mode, run_dir, FinetuneConfig)."""
    path = Path(run_dir_or_checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    run_dir = find_run_dir(path)
    if run_dir is None or not (run_dir / MODEL_CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is not a fine-tuning run (no {CONFIG_NAME} + {MODEL_CONFIG_NAME} found); "
                              f"evaluate and predict need the output of `mmfuse finetune`")
    cfg = load_config(FinetuneConfig, run_dir / CONFIG_NAME)
    info = read_task_info(run_dir)
    model = build_classifier(read_backbone_config(run_dir), cfg.mode, cfg.pooling, task=info["task"],
                             num_classes=info["num_classes"], seg_channels=cfg.seg_channels,
                             modalities=cfg.modalities)
    load_weights(model, resolve_weights(path))
    return model.to(device).eval(), run_dir, cfg


class TaskObjective(nn.Module):
    """A task model under the pretraining contract (models/contract.py): objective = metric "loss" = the task
    loss of its logits. With `features`, batches hold precomputed pooled features ("features") and only the
    model's head runs (a linear probe on a frozen backbone)."""

    metric_names = ("loss",)

    def __init__(self, model: nn.Module, loss: LossFn, features: bool = False):
        super().__init__()
        self.model, self.loss, self.features = model, loss, features
        self.batch_keys = ("features", "label") if features else (*model.modalities, "label")

    def forward(self, batch, generator=None, step=None) -> dict[str, torch.Tensor]:
        logits = self.model.head(batch["features"]) if self.features else self.model(batch)
        loss = self.loss(logits, batch["label"])
        return {"objective": loss, "loss": loss}
