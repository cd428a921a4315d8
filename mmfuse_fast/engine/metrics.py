"""Multi-label classification metrics, computed once over the whole evaluation set.

Definitions (BigEarthNet convention, SPEC §1 "Metric conventions"):

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
