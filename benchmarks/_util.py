"""Shared helpers of the benchmark scripts: where rows go (one flushed CSV row per measurement), stage time budgets,
timing (CUDA graphs of N captured calls, host overhead per call, percentiles), peak memory, device facts and the
measured ceilings every figure is given as a fraction of."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Rows of a run go outside the tracked tree, so that running a benchmark never dirties the checkout; curated rows
# are copied into benchmarks/results/ by hand, with the device name in the file name.
DEFAULT_OUT = ROOT / "runs" / "bench"
CURATED_DIR = Path(__file__).resolve().parent / "results"
CEILINGS_FILE = "facts.json"


# --------------------------------------------------------------------------------------------------------------
# where rows go
# --------------------------------------------------------------------------------------------------------------


def results_dir(out: str | os.PathLike | None = None) -> Path:
    """`out`, else $BENCH_OUT, else runs/bench/ (created)."""
    path = Path(out or os.environ.get("BENCH_OUT") or DEFAULT_OUT)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Rows:
    """One CSV per benchmark; every row is written and flushed the moment it is measured, so a run killed at its
    time limit keeps every row before it. A row with a column the file lacks rewrites the file with that column."""

    def __init__(self, name: str, out: str | os.PathLike | None = None):
        self.path = results_dir(out) / f"{name}.csv"
        self.written: list[dict] = []

    def _fields(self) -> list[str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        with self.path.open(newline="") as fh:
            return next(csv.reader(fh), [])

    def write(self, row: dict) -> dict:
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **row}
        fields = self._fields()
        missing = [k for k in row if k not in fields]
        if fields and missing:
            with self.path.open(newline="") as fh:
                old = list(csv.DictReader(fh))
            fields += missing
            with self.path.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(old)
        elif not fields:
            fields = list(row)
            with self.path.open("w", newline="") as fh:
                csv.DictWriter(fh, fieldnames=fields).writeheader()
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields, restval="").writerow({k: _cell(v) for k, v in row.items()})
            fh.flush()
            os.fsync(fh.fileno())
        self.written.append(row)
        return row


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else float(f"{value:.5g}")
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def append_rows(name: str, rows: list[dict], out: str | os.PathLike | None = None) -> Path:
    """Appends finished rows to <results dir>/<name>.csv."""
    writer = Rows(name, out)
    for row in rows:
        writer.write(row)
    return writer.path


class Budget:
    """Seconds left to a stage; a benchmark records the rows it skips once the budget is spent. None: unlimited."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def allows(self, estimate_s: float = 0.0) -> bool:
        return self.left() > estimate_s

    def skip_reason(self) -> str:
        return f"skipped: stage budget of {self.seconds:.0f} s spent"


def add_common_args(parser, default_budget: float | None = None) -> None:
    parser.add_argument("--out", default=None, help=f"results folder (default $BENCH_OUT or {DEFAULT_OUT})")
    parser.add_argument("--budget", type=float, default=default_budget,
                        help="seconds for the whole run; rows after it are recorded as skipped")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks that every path runs")


# --------------------------------------------------------------------------------------------------------------
# device facts and ceilings
# --------------------------------------------------------------------------------------------------------------


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device: torch.device, small: bool = False) -> dict:
    """Measured bf16 and TF32 GEMM TFLOP/s (square matmuls) and copy bandwidth (TB/s, bytes read + written); each
    the 20th-percentile time of 5 runs of back-to-back calls (clock ramp-up and a stray stall left out)."""
    n = 512 if small else 8192
    copy_bytes = (16 if small else 2048) * 2**20
    result = {}
    for key, dtype, tf32 in (("gemm_bf16_tflops", torch.bfloat16, False), ("gemm_tf32_tflops", torch.float32, True)):
        if device.type == "cpu" and dtype == torch.bfloat16:
            dtype = torch.float32
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        ms = back_to_back(lambda: torch.matmul(a, b, out=out), device, calls=3 if small else 20, reps=5)[0]
        torch.backends.cuda.matmul.allow_tf32 = previous
        result[key] = round(2 * n**3 / (ms * 1e-3) / 1e12, 3)
        result[key.replace("tflops", "shape")] = f"{n}x{n}x{n}"
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms = back_to_back(lambda: dst.copy_(src), device, calls=3 if small else 20, reps=5)[0]
    result["copy_tbps"] = round(2 * copy_bytes / (ms * 1e-3) / 1e12, 4)
    result["copy_bytes"] = copy_bytes
    return result


def ceilings(device: torch.device, out: str | os.PathLike | None = None, small: bool = False) -> dict:
    """The ceilings recorded in the results folder's facts.json for this device, else measured now (and added)."""
    path = results_dir(out) / CEILINGS_FILE
    facts = json.loads(path.read_text()) if path.exists() else {}
    name = device_name(device)
    if facts.get("ceilings", {}).get("device") == name:
        return facts["ceilings"]
    facts["ceilings"] = {"device": name, **measure_ceilings(device, small=small)}
    path.write_text(json.dumps(facts, indent=1))
    return facts["ceilings"]


# Vendor dense (no sparsity) figures: bf16 tensor-core TFLOP/s and DRAM GB/s.
SPEC_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
SPEC_BANDWIDTH_GBPS = {"H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "GH200": 4000,
                       "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "A10": 600,
                       "L4": 300}


def spec_value(table: dict, name: str) -> float | None:
    for key in sorted(table, key=len, reverse=True):
        if key in name:
            return table[key]
    return None


def fraction(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return round(value / ceiling, 4)


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------


def quantiles(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return q[1], statistics.median(times), q[7]


def back_to_back(fn, device: torch.device, calls: int, reps: int, warmup: int = 1) -> tuple[float, float, float]:
    """(p20, p50, p80) ms per call over `reps` samples, each the mean of `calls` back-to-back calls (CUDA events
    around them on a GPU: the host is free to run ahead, as in a training loop)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return quantiles(times)


def host_and_eager(fn, device: torch.device, calls: int) -> tuple[float, float]:
    """(host µs to issue one call, wall ms per call with the device finishing): `calls` eager calls back to back.
    Host time close to the wall time means the call is host-bound."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e3


def graphed(fn, device: torch.device, calls: int, reps: int = 10, warmup: int = 3) -> dict:
    """Times `fn` the way the engine runs it: `calls` calls captured in one CUDA graph, replayed `reps` times.

    Returns {"graph_p20_ms", "graph_p50_ms", "graph_p80_ms" (device time per call), "host_us" and "eager_ms"
    (eager, from host_and_eager), "graph_error"}. On the CPU, or when capture fails, only the eager figures and the
    error. `fn` must have run once already (compilation, autotuning: neither may happen during capture)."""
    result = {}
    for _ in range(warmup):
        fn()
    host_us, eager_ms = host_and_eager(fn, device, calls)
    result.update(host_us=round(host_us, 2), eager_ms=eager_ms)
    if device.type != "cuda":
        times = []
        for _ in range(max(2, reps // 3)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        result.update(zip(("eager_p20_ms", "eager_p50_ms", "eager_p80_ms"), quantiles(times)))
        return result
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        result.update(zip(("graph_p20_ms", "graph_p50_ms", "graph_p80_ms"), quantiles(times)))
        del graph
    except Exception as error:  # noqa: BLE001 - a provider that cannot be captured is timed eagerly, and says why
        result["graph_error"] = f"{type(error).__name__}: {error}"[:200]
        torch.cuda.synchronize(device)
    return result


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
    return {name: (quantiles(t), peaks[name]) for name, t in times.items()}


def result_row(op, backend, shape, dtype, device, times, peak, **extra) -> dict:
    row = {"op": op, "backend": backend, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
           "device": device_name(device), "p20_ms": round(times[0], 4), "p50_ms": round(times[1], 4),
           "p80_ms": round(times[2], 4), "peak_mib": None if peak is None else round(peak, 2),
           "torch": torch.__version__}
    row.update(extra)
    return row


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """--ab "name:module.attr=value;module.attr=value" (repeatable) -> {name: [assignments]}."""
    variants = {}
    for spec in specs:
        name, _, assignments = spec.partition(":")
        variants[name] = [a for a in assignments.split(";") if a]
    return variants


def set_switches(assignments: list[str]) -> dict:
    """Applies A/B switches given as `module.attribute=value` (value parsed as JSON, else kept as a string) and
    returns {assignment: previous value} so that `restore_switches` can undo them."""
    import importlib

    previous = {}
    for assignment in assignments:
        target, _, raw = assignment.partition("=")
        module_name, _, attribute = target.rpartition(".")
        module = importlib.import_module(module_name)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        previous[target] = getattr(module, attribute)
        setattr(module, attribute, value)
    return previous


def restore_switches(previous: dict) -> None:
    import importlib

    for target, value in previous.items():
        module_name, _, attribute = target.rpartition(".")
        setattr(importlib.import_module(module_name), attribute, value)


_PRINTED_CHOICES: set = set()


def print_autotune_choices() -> None:
    """One `AUTOTUNE <kernel> key=... config=...` line per tuned launch of the package's Triton kernels in this
    process not printed before (the GPU session collects them into autotune.log; Triton itself prints only fresh
    tunings, not those read from its cache)."""
    import sys

    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("mmfuse_fast.kernels") or module is None:
            continue
        for attribute, obj in list(vars(module).items()):
            if isinstance(obj, Autotuner):
                for key, config in list(obj.cache.items()):
                    line = f"AUTOTUNE {module_name}.{attribute} key={key} config={config}"
                    if line not in _PRINTED_CHOICES:
                        _PRINTED_CHOICES.add(line)
                        print(line, flush=True)
