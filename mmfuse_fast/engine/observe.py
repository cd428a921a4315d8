"""Throughput observability: per-interval samples/s, step time, data-loading share, TFLOP/s, MFU, peak memory.

MFU = achieved model FLOP/s (analytic count, `model.flops_per_sample()`, forward + backward) / the device's dense
peak for the step's compute dtype. Peaks come from `PEAK_TFLOPS` (dense, no sparsity) by device name, or from the
environment variable MMFUSE_PEAK_TFLOPS; unknown devices (the CPU) report MFU as null.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from mmfuse_fast.engine.rundir import TENSORBOARD_DIR

__all__ = ["PEAK_TFLOPS", "peak_tflops", "ThroughputMeter", "TensorBoardWriter", "peak_rss_mib"]

# Dense tensor-core peaks in TFLOP/s: (bf16/fp16, tf32, fp32).
PEAK_TFLOPS = {
    "H200": (989.0, 494.0, 67.0),
    "H100 SXM": (989.0, 494.0, 67.0),
    "H100 80GB HBM3": (989.0, 494.0, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100 NVL": (835.0, 418.0, 60.0),
    "H100": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
    "A10G": (125.0, 62.5, 31.2),
    "L4": (121.0, 60.0, 30.3),
    "RTX 4090": (165.0, 82.6, 82.6),
}


def peak_tflops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's dense peak for `dtype` (None = fp32; tf32 if matmuls allow it), or None when unknown."""
    env = os.environ.get("MMFUSE_PEAK_TFLOPS")
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAK_TFLOPS.items():
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class ThroughputMeter:
    """Host-side timing of the loop: call `data_start/data_end` around batch fetching, `interval()` at a log step
    (after the metrics read, which synchronises the device) for the figures of the interval."""

    def __init__(self, device: torch.device, global_batch: int, flops_per_sample: float | None,
                 peak: float | None):
        self.device, self.global_batch = device, global_batch
        self.flops_per_sample, self.peak = flops_per_sample, peak
        self._t0 = time.perf_counter()
        self._data = 0.0
        self._steps = 0
        self._d0 = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def data_start(self) -> None:
        self._d0 = time.perf_counter()

    def data_end(self) -> None:
        self._data += time.perf_counter() - self._d0

    def step_done(self) -> None:
        self._steps += 1

    def interval(self) -> dict:
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        out: dict = {}
        if self._steps:
            sps = self._steps * self.global_batch / dt
            out["samples_per_s"] = round(sps, 3)
            out["step_time_ms"] = round(1e3 * dt / self._steps, 3)
            out["data_pct"] = round(100.0 * self._data / dt, 2)
            if self.flops_per_sample:
                tflops = sps * self.flops_per_sample / 1e12
                out["tflops"] = round(tflops, 4)
                out["mfu"] = round(tflops / self.peak, 4) if self.peak else None
        if self.device.type == "cuda":
            out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            rss = peak_rss_mib()
            out["peak_mem_mib"] = None if rss is None else round(rss, 1)
        self._t0, self._data, self._steps = now, 0.0, 0
        return out


class TensorBoardWriter:
    """Scalars to `run_dir/tensorboard` when the `tensorboard` package is installed; otherwise a one-line note."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            import sys

            print("note: tensorboard is not installed; metrics go to metrics.jsonl only "
                  "(pip install tensorboard to get them in TensorBoard too)", file=sys.stderr)
            return
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))

    def write(self, step: int, record: dict) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
