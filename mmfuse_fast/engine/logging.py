"""Metric logging: losses accumulated on the device, read once per log interval, written as JSON lines.

`metrics.jsonl` in the run directory gets one object per log interval, e.g.::

    {"step": 10, "lr": 0.0005, "loss": 1.23, "loss_rec": 0.98, "loss_con": 0.5, "grad_norm": 0.7,
     "samples_per_s": 41.2, "elapsed_s": 2.1}

Loss values are means over the steps since the previous line. The only host synchronisation is at a log
interval (SPEC §4: no `.item()` inside the training step).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmfuse_fast.engine.rundir import METRICS_NAME
from mmfuse_fast.errors import NonFiniteLossError

__all__ = ["LoggingConfig", "MetricLogger", "NonFiniteLossError", "read_metrics", "truncate_metrics"]


@dataclass
class LoggingConfig:
    every: int = 10  # steps per metrics.jsonl line (and progress-bar update)
    progress: bool = True  # show a tqdm bar


class MetricLogger:
    """Accumulates scalar tensors on their device; `log()` reads them once, writes a JSONL line, updates the bar.

    It also remembers the first step whose loss was not finite, on the device, so the check costs no sync."""

    def __init__(self, run_dir: str | Path, config: LoggingConfig, total_steps: int, start_step: int = 0,
                 desc: str = "train", batch_size: int = 1):
        self.path = Path(run_dir) / METRICS_NAME
        self.config = config
        self.batch_size = batch_size
        self._file = open(self.path, "a")
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._bad_step: torch.Tensor | None = None  # first step with a non-finite loss, -1 if none
        self._t0 = time.perf_counter()
        self._t_last = self._t0
        self._steps_since = 0
        self.last: dict = {}
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                        disable=not config.progress, mininterval=0.5)

    def should_log(self, step: int) -> bool:
        return self.config.every > 0 and step % self.config.every == 0

    @torch.no_grad()
    def accumulate(self, step: int, values: dict[str, torch.Tensor]) -> None:
        """Adds this step's scalars (device tensors or floats) to the running sums; `values["loss"]` is also
        checked for finiteness, on the device."""
        for name, v in values.items():
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(float(v))
            v = v.detach().float()
            self._sums[name] = self._sums[name] + v if name in self._sums else v.clone()
        loss = values.get("loss")
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach())
            step_t = torch.full((), step, device=loss.device, dtype=torch.long)
            if self._bad_step is None:
                self._bad_step = torch.full((), -1, device=loss.device, dtype=torch.long)
            self._bad_step = torch.where(bad & (self._bad_step < 0), step_t, self._bad_step)
        self._count += 1
        self._steps_since += 1
        self.bar.update(1)

    def tick(self, step: int) -> None:
        """Counts a step whose metrics are accumulated elsewhere (the TrainStep's device accumulator)."""
        self._steps_since += 1
        self.bar.update(1)

    def check_finite(self) -> None:
        """Raises NonFiniteLossError naming the first step whose loss was not finite (one host sync)."""
        if self._bad_step is not None:
            bad = int(self._bad_step)
            if bad >= 0:
                raise NonFiniteLossError(
                    f"loss is not finite (NaN or inf) at step {bad}; lower the learning rate, check the input data "
                    f"normalization, or enable gradient clipping"
                )

    def log(self, step: int, extra: dict | None = None) -> dict:
        """Reads the accumulated means (one sync), writes one JSON line, updates the progress bar."""
        self.check_finite()
        record: dict = {"step": step}
        if self._count:
            names = list(self._sums)
            means = (torch.stack([self._sums[n] for n in names]) / self._count).tolist()
            record.update({n: _clean(m) for n, m in zip(names, means)})
        now = time.perf_counter()
        dt = now - self._t_last
        if self._steps_since and dt > 0:
            record["samples_per_s"] = round(self._steps_since * self.batch_size / dt, 3)
        record["elapsed_s"] = round(now - self._t0, 3)
        if extra:
            record.update({k: _clean(v) for k, v in extra.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._sums.clear()
        self._count = 0
        self._steps_since = 0
        self._t_last = now
        self.last = record
        shown = {k: f"{record[k]:.4g}" for k in ("loss", "loss_rec", "loss_con", "lr") if k in record}
        self.bar.set_postfix(shown, refresh=False)
        return record

    def close(self) -> None:
        self.bar.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
