"""Shared helpers of the benchmark scripts: timing percentiles, peak memory, device name, CSV rows."""

from __future__ import annotations

import csv
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"CPU x{torch.get_num_threads()} threads"


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mib(fn, device: torch.device) -> float | None:
    """Peak memory one call of fn adds over what was allocated before it (CUDA allocator; RSS on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _reset_peak_rss():
        return None
    base = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0) / 1024


def measure(fn, device: torch.device, warmup: int = 2, reps: int = 10):
    """((p20, p50, p80) milliseconds, peak extra memory in MiB or None). CUDA times come from events."""
    return measure_interleaved({"fn": fn}, device, warmup=warmup, reps=reps)["fn"]


def measure_interleaved(fns: dict, device: torch.device, warmup: int = 2, reps: int = 10) -> dict:
    """{name: ((p20, p50, p80) ms, peak MiB)} for several providers timed in alternation (rep i of every provider
    before rep i + 1 of any), so a drift of the machine's speed during the run weighs on all of them alike."""
    peaks = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        peaks[name] = peak_memory_mib(fn, device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (_quantiles(t), peaks[name]) for name, t in times.items()}


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return q[1], statistics.median(times), q[7]


def result_row(op, backend, shape, dtype, device, times, peak, **extra) -> dict:
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "op": op, "backend": backend,
           "shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": device_name(device),
           "p20_ms": round(times[0], 4), "p50_ms": round(times[1], 4), "p80_ms": round(times[2], 4),
           "peak_mib": None if peak is None else round(peak, 2), "torch": torch.__version__}
    row.update(extra)
    return row


def append_rows(name: str, rows: list[dict]) -> Path:
    """Appends rows to benchmarks/results/<name>.csv (header written when the file is new)."""
    path = RESULTS_DIR / f"{name}.csv"
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
