"""Multi-label, scene (single-label) and segmentation metrics, computed once over the whole evaluation set.

Definitions (BigEarthNet convention; docs/method.md, Downstream tasks and metrics):

- **average precision** (AP) of one score/label column is the step-wise area under the precision-recall curve,
  exactly as scikit-learn's `average_precision_score`: `AP = sum_n (R_n - R_{n-1}) * P_n` over the distinct score
  thresholds in decreasing order (tied scores form one threshold), with `R_0 = 0`.
- **micro mAP** (`map_micro`): the AP of all (sample, class) pairs flattened into one column — what the field
  reports for BigEarthNet.
- **macro mAP** (`map_macro`): the mean of the per-class APs over the classes that have **at least one positive**
  in the evaluation set. A class without positives has no defined AP and is left out (scikit-learn would count it
  as 0, which penalises a model for the make-up of a small test set); `n_classes_scored` says how many counted.
- **sample F1** (`f1_samples`): predictions are `sigmoid(logit) >= 0.5` (i.e. `logit >= 0`); F1 is computed per
  sample as `2 TP / (2 TP + FP + FN)` and averaged over samples; a sample with no true and no predicted label
  scores 0 (scikit-learn's `f1_score(average="samples", zero_division=0)`).

All metrics are reported as fractions in [0, 1] (multiply by 100 for the paper's tables). They are computed in
float64 on the CPU from the concatenated logits, never averaged per batch.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "average_precision",
    "map_micro",
    "map_macro",
    "per_class_average_precision",
    "f1_samples",
    "multilabel_metrics",
    "MultiLabelMetrics",
    "scene_metrics",
    "SceneMetrics",
    "confusion_matrix",
    "segmentation_metrics_from_confusion",
    "SegmentationMetrics",
]


def _as_tensor(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.detach().to("cpu", torch.float64)


def average_precision(scores, targets) -> float:
    """AP of one column (1-D scores, 1-D {0,1} targets), as sklearn's `average_precision_score`; NaN without
    positives."""
    scores, targets = _as_tensor(scores).reshape(-1), _as_tensor(targets).reshape(-1)
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
    n_pos = targets.sum()
    if scores.numel() == 0 or n_pos <= 0:
        return math.nan
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], targets[order]
    tp = torch.cumsum(y, 0)
    fp = torch.cumsum(1.0 - y, 0)
    # the last position of each run of equal scores is one threshold
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - recall_prev) * precision).sum())


def per_class_average_precision(scores, targets) -> list[float]:
    """AP of each column of (N, K) scores/targets; NaN for a class with no positives."""
    scores, targets = _as_tensor(scores), _as_tensor(targets)
    _check_2d(scores, targets)
    return [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]


def map_micro(scores, targets) -> float:
    scores, targets = _as_tensor(scores), _as_tensor(targets)
    _check_2d(scores, targets)
    return average_precision(scores.reshape(-1), targets.reshape(-1))


def map_macro(scores, targets) -> float:
    """Mean AP over the classes with at least one positive (NaN when no class has one)."""
    aps = [a for a in per_class_average_precision(scores, targets) if not math.isnan(a)]
    return sum(aps) / len(aps) if aps else math.nan


def f1_samples(logits, targets, threshold: float = 0.5) -> float:
    """Sample-averaged F1 of `sigmoid(logits) >= threshold` (zero for a sample with no true and no predicted
    label)."""
    logits, targets = _as_tensor(logits), _as_tensor(targets)
    _check_2d(logits, targets)
    if logits.shape[0] == 0:
        return math.nan
    pred = (torch.sigmoid(logits) >= threshold).to(torch.float64)
    truth = (targets > 0.5).to(torch.float64)
    tp = (pred * truth).sum(1)
    denom = pred.sum(1) + truth.sum(1)  # 2TP + FP + FN
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return float(f1.mean())


def multilabel_metrics(logits, targets) -> dict:
    """All metrics of one evaluation set: map_micro, map_macro, f1_samples, per-class AP, counts."""
    logits, targets = _as_tensor(logits), _as_tensor(targets)
    _check_2d(logits, targets)
    per_class = per_class_average_precision(logits, targets)
    scored = [a for a in per_class if not math.isnan(a)]
    return {
        "map_micro": map_micro(logits, targets),
        "map_macro": sum(scored) / len(scored) if scored else math.nan,
        "f1_samples": f1_samples(logits, targets),
        "n_samples": int(logits.shape[0]),
        "n_classes_scored": len(scored),
        "ap_per_class": per_class,
    }


def _check_2d(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected (N, K) scores and targets of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")


class MultiLabelMetrics:
    """Accumulates logits and targets batch by batch (kept on their device, no host sync), computes once.

    >>> m = MultiLabelMetrics()
    >>> for batch in loader: m.update(model(batch), batch["label"])
    >>> m.compute()  # {"map_micro": ..., "map_macro": ..., "f1_samples": ..., "n_samples": ...}
    """

    def __init__(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def reset(self) -> None:
        self._logits.clear()
        self._targets.clear()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        self._logits.append(logits.detach())
        self._targets.append(targets.detach())

    def compute(self) -> dict:
        if not self._logits:
            raise ValueError("MultiLabelMetrics.compute() before any update()")
        logits = torch.cat([t.float() for t in self._logits]).cpu()
        targets = torch.cat([t.float() for t in self._targets]).cpu()
        return multilabel_metrics(logits, targets)


# ---------------------------------------------------------------------------------------------------------------
# Single-label scene classification (SEN12MS)
#
# top-k accuracy: the true class is among the k highest logits (ties broken by torch.topk). Weighted precision /
# recall / F1: per-class precision, recall and F1 of the arg-max prediction, averaged with weights = the class's
# number of true samples (scikit-learn's average="weighted", zero_division=0: a class never predicted has
# precision 0). Weighted recall equals top-1 accuracy.


def scene_metrics(logits, targets, num_classes: int | None = None) -> dict:
    """top1, top3, precision/recall/f1 (weighted), per-class counts, from (N, K) logits and (N,) int targets."""
    logits = _as_tensor(logits)
    targets = torch.as_tensor(targets).detach().cpu().long().reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected (N, K) logits and (N,) targets, got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    n, k = logits.shape
    num_classes = num_classes or k
    if n == 0:
        raise ValueError("scene_metrics of an empty set")
    pred = logits.argmax(1)
    topk = logits.topk(min(3, k), dim=1).indices
    cm = confusion_matrix(pred, targets, num_classes)
    out = {"top1": float((pred == targets).double().mean()),
           "top3": float((topk == targets[:, None]).any(1).double().mean())}
    out.update(_prf_from_confusion(cm, average="weighted"))
    out["n_samples"] = int(n)
    return out


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted; pixels/samples at `ignore_index` dropped.
    Runs on the tensors' device (no host sync)."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    index = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def _prf_from_confusion(cm: torch.Tensor, average: str) -> dict:
    cm = cm.double().cpu()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp))
    if average == "weighted":
        w = support / support.sum().clamp_min(1)
        return {"precision": float((precision * w).sum()), "recall": float((recall * w).sum()),
                "f1": float((f1 * w).sum()), "f1_per_class": f1.tolist()}
    raise ValueError(average)


class SceneMetrics(MultiLabelMetrics):
    """Accumulates (B, K) logits and (B,) class targets; `compute()` -> scene_metrics over the whole set."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._logits.append(logits.detach())
        self._targets.append(targets.detach().reshape(-1))

    def compute(self) -> dict:
        if not self._logits:
            raise ValueError("SceneMetrics.compute() before any update()")
        return scene_metrics(torch.cat([t.float() for t in self._logits]).cpu(),
                             torch.cat(self._targets).cpu(), self.num_classes)


# ---------------------------------------------------------------------------------------------------------------
# Semantic segmentation
#
# One confusion matrix over every labelled pixel of the evaluation set (pixels at the ignore index left out).
# IoU_c = TP / (TP + FP + FN); F1_c = 2 TP / (2 TP + FP + FN); a class with TP + FP + FN = 0 (absent from both
# the labels and the predictions) has no IoU/F1 and is left out of the means (mmsegmentation's nanmean).
# OA = trace / total.


def segmentation_metrics_from_confusion(cm: torch.Tensor) -> dict:
    cm = cm.double().cpu()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    union = tp + fp + fn
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    f1 = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.full_like(tp, math.nan))
    total = cm.sum()
    return {"miou": float(iou[present].mean()) if present.any() else math.nan,
            "oa": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_f1": float(f1[present].mean()) if present.any() else math.nan,
            "iou_per_class": iou.tolist(), "f1_per_class": f1.tolist(), "n_pixels": int(total)}


class SegmentationMetrics:
    """Accumulates a (K, K) confusion matrix on the device from (B, K, H, W) logits or (B, H, W) predictions."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm: torch.Tensor | None = None

    def reset(self) -> None:
        self.cm = None

    @torch.no_grad()
    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == target.dim() + 1 else logits_or_pred
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.cm = cm if self.cm is None else self.cm + cm

    def compute(self) -> dict:
        if self.cm is None:
            raise ValueError("SegmentationMetrics.compute() before any update()")
        return segmentation_metrics_from_confusion(self.cm)
