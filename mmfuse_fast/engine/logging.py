"""Metric logging: the records read from the device once per log interval, written as JSON lines.

`metrics.jsonl` in the run directory gets one object per log interval, e.g.::

    {"step": 10, "lr": 0.0005, "loss": 1.23, "loss_rec": 0.98, "loss_con": 0.5, "grad_norm": 0.7,
     "samples_per_s": 41.2, "elapsed_s": 2.1}

Loss values are means over the steps since the previous line. The only host synchronisation is at a log
interval (docs/method.md, Conventions: no `.item()` inside the training step).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmfuse_fast.engine.rundir import METRICS_NAME

__all__ = ["MetricLogger", "progress_fields", "read_metrics", "truncate_metrics"]


class MetricLogger:
    """Writes one JSON line per log interval and keeps the progress bar. The metrics themselves are summed on the
    device by the TrainStep and read once per interval (`TrainStep.read_metrics`); this class only counts steps,
    writes what it is given and shows its headline fields."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, desc: str = "train",
                 progress: bool = True):
        self.path = Path(run_dir) / METRICS_NAME
        self._file = open(self.path, "a")
        self._t0 = time.perf_counter()
        self.last: dict = {}
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                        disable=not progress, mininterval=0.5)

    def tick(self, step: int) -> None:
        """Counts one step on the progress bar."""
        self.bar.update(1)

    def log(self, step: int, record: dict) -> dict:
        """Writes `{"step": step, **record, "elapsed_s"}` as one JSON line and updates the progress bar."""
        out = {"step": step, **{k: _clean(v) for k, v in record.items()},
               "elapsed_s": round(time.perf_counter() - self._t0, 3)}
        self._file.write(json.dumps(out) + "\n")
        self._file.flush()
        self.last = out
        self.bar.set_postfix(progress_fields(out), refresh=False)
        return out

    def close(self) -> None:
        self.bar.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# what the progress bar shows of a record: the losses, the learning rate, and how fast and how big the run is
_BAR_FIELDS = (("loss", "loss", "{:.4g}"), ("lr", "lr", "{:.3g}"), ("samples_per_s", "samples/s", "{:.1f}"),
               ("mfu", "MFU", "{:.1%}"), ("peak_mem_mib", "mem", "{:.0f}MiB"))


def progress_fields(record: dict) -> dict[str, str]:
    """The progress bar's postfix of a metrics record (fields the record lacks or holds no number for are left
    out)."""
    out = {}
    for key, label, fmt in _BAR_FIELDS:
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[label] = fmt.format(v)
    return out


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (or of the one in a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drops the lines logged after `step` (a resumed run re-logs them)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    from mmfuse_fast.engine.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
