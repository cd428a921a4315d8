"""Benchmark of `multiscale_infonce` (forward + backward): time and peak extra memory against the batch size.

    python benchmarks/bench_infonce.py                   # quick CPU run: B 1k -> 16k, S=2, D=128 (+ D=256 to 2k)
    python benchmarks/bench_infonce.py --device cuda     # GPU: B 1k -> 64k, D=128 and 256, all providers

Providers:
  naive     backend="reference": materializes the S x B x B logits (and their gradient)
  chunked   backend="chunked": the memory-linear PyTorch path (what backend="auto" runs without Triton)
  triton    backend="triton": one fused pass for both softmax directions, forward and backward
  two_pass  the Inf-CL approach: two one-direction tiled passes (the Triton kernels with symmetric=False,
            anchors->views and views->anchors), averaged; the same loss as symmetric=True
Inputs are L2-normalized (as the loss expects; unnormalized randn logits of |L| ~ 100 make every backend hit
the CPU's slow denormal path). On the CPU every configuration runs in its own subprocess, and the peak extra
memory is the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the call; on a GPU it is
torch.cuda.max_memory_allocated over the memory allocated before the call. Large CPU configurations get a single
timed call (p20 = p50 = p80) to keep the quick run short. As in bench_crop_resize.py, torch's CPU allocator is
asked for transparent huge pages (THP_MEM_ALLOC_ENABLE=1, the same for every provider; --no-thp to disable):
page faults on these VMs cost microseconds, which otherwise dominates the naive loss's multi-GB buffers.

Rows go to benchmarks/results/infonce.csv; the last printed line is a JSON object with the headline figures:
memory_ratio_16k (naive / chunked peak extra memory, B=16384, D=128, S=2), time_ratio_16k (chunked / naive time),
the chunked memory growth per doubling of B, and on a GPU the speedups of triton over naive and over two_pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator at its first allocation

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import append_rows, device_name, peak_memory_mib, result_row  # noqa: E402

from mmfuse_fast import __version__  # noqa: E402
from mmfuse_fast.ops import multiscale_infonce  # noqa: E402

PROVIDERS = ("naive", "chunked", "triton", "two_pass")


def make_step(provider: str, n_scales: int, batch: int, dim: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    views = F.normalize(torch.randn(n_scales, batch, dim, generator=gen), dim=-1).to(device, dtype)
    anchors = F.normalize(torch.randn(n_scales, batch, dim, generator=gen), dim=-1).to(device, dtype)
    anchors.requires_grad_()
    views.requires_grad_()
    temperature = 0.1

    if provider == "two_pass":
        def loss_fn():
            forward = multiscale_infonce(anchors, views, temperature, symmetric=False, backend="triton")
            backward = multiscale_infonce(views, anchors, temperature, symmetric=False, backend="triton")
            return 0.5 * (forward + backward)
    else:
        backend = {"naive": "reference", "chunked": "chunked", "triton": "triton"}[provider]

        def loss_fn():
            return multiscale_infonce(anchors, views, temperature, symmetric=True, backend=backend)

    def step():
        anchors.grad = None
        views.grad = None
        loss_fn().backward()

    return step


def run_config(provider, n_scales, batch, dim, dtype, device, reps, budget_s):
    """(times in ms sorted, peak extra MiB); more timed calls while the time budget lasts, at most `reps`."""
    step = make_step(provider, n_scales, batch, dim, dtype, device)

    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    times = []
    if device.type == "cuda":
        timed()  # warm-up: compilation, autotuning, allocator
        deadline = time.perf_counter() + budget_s
        peak = peak_memory_mib(step, device)
    else:  # the CPU needs no warm-up: the memory-measured call is also the first time sample
        deadline = time.perf_counter() + budget_s
        peak = peak_memory_mib(lambda: times.append(timed()), device)
    while len(times) < reps and (not times or time.perf_counter() < deadline):
        times.append(timed())
    return sorted(times), peak


def percentiles(times):
    import statistics

    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def worker(spec: str) -> None:
    provider, n_scales, batch, dim, dtype, device, reps, budget = spec.split(",")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    times, peak = run_config(provider, int(n_scales), int(batch), int(dim), getattr(torch, dtype),
                             torch.device(device), int(reps), float(budget))
    print(json.dumps({"times": times, "peak": peak}))


def run_in_subprocess(provider, n_scales, batch, dim, dtype, device, reps, budget, timeout):
    spec = ",".join(map(str, (provider, n_scales, batch, dim, str(dtype).replace("torch.", ""), device, reps, budget)))
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, None, "timeout"
    if out.returncode != 0:
        return None, None, (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:200]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["times"], result["peak"], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes")
    parser.add_argument("--dims", default=None, help="comma-separated embedding sizes")
    parser.add_argument("--max-size-256", type=int, default=None, help="largest B measured at D=256")
    parser.add_argument("--scales", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16/float16 (GPU default bf16)")
    parser.add_argument("--providers", default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per configuration")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--no-thp", action="store_true", help="do not enable transparent huge pages (CPU)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)  # (the THP choice reaches the worker through the inherited environment)
        return

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        ([1024, 2048, 4096, 8192, 16384, 32768, 65536] if cuda else [1024, 2048, 4096, 8192, 16384])
    dims = [int(d) for d in args.dims.split(",")] if args.dims else [128, 256]
    max_256 = args.max_size_256 or (max(sizes) if cuda else 2048)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    providers = args.providers.split(",") if args.providers else (list(PROVIDERS) if cuda else ["naive", "chunked"])
    reps = args.reps or (20 if cuda else 3)
    budget = args.budget or (2.0 if cuda else 1.5)

    rows, results = [], {}
    print(f"multiscale_infonce fwd+bwd on {device_name(device) if cuda else 'CPU'}, S={args.scales}, {dtype}")
    print(f"{'provider':>9} {'B':>6} {'D':>4} {'p20 ms':>10} {'p50 ms':>10} {'p80 ms':>10} {'peak MiB':>10}")
    for dim in dims:
        for batch in sizes:
            if dim == 256 and batch > max_256:
                continue
            for provider in providers:
                if cuda:
                    try:
                        times, peak = run_config(provider, args.scales, batch, dim, dtype, device, reps, budget)
                        err = None
                    except torch.OutOfMemoryError:
                        times, peak, err = None, None, "out of memory"
                    torch.cuda.empty_cache()
                else:
                    times, peak, err = run_in_subprocess(provider, args.scales, batch, dim, dtype, "cpu", reps,
                                                         budget, timeout=900)
                if err:
                    print(f"{provider:>9} {batch:>6} {dim:>4}  failed: {err}")
                    continue
                p20, p50, p80 = percentiles(times)
                results[(provider, batch, dim)] = (p50, peak)
                print(f"{provider:>9} {batch:>6} {dim:>4} {p20:>10.2f} {p50:>10.2f} {p80:>10.2f} "
                      f"{'n/a' if peak is None else f'{peak:10.1f}':>10}", flush=True)
                rows.append(result_row("multiscale_infonce", provider, f"S={args.scales},B={batch},D={dim}", dtype,
                                       device, (p20, p50, p80), peak, version=__version__, n_timed=len(times)))
    if rows and not args.no_csv:
        append_rows("infonce", rows)

    def ratio(num, den, index):
        a, b = results.get(num), results.get(den)
        if a is None or b is None or a[index] is None or b[index] is None or b[index] <= 0:
            return None
        return round(a[index] / b[index], 3)

    big = 16384
    headline = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "S": args.scales,
                "memory_ratio_16k": ratio(("naive", big, 128), ("chunked", big, 128), 1),
                "time_ratio_16k": ratio(("chunked", big, 128), ("naive", big, 128), 0)}
    growth = [ratio(("chunked", 2 * b, 128), ("chunked", b, 128), 1) for b in sizes if 2 * b in sizes]
    headline["chunked_memory_growth_per_doubling"] = growth
    headline["naive_memory_growth_per_doubling"] = [ratio(("naive", 2 * b, 128), ("naive", b, 128), 1)
                                                    for b in sizes if 2 * b in sizes]
    if "triton" in providers:
        for batch in sizes:
            for dim in dims:
                headline[f"triton_speedup_vs_naive_B{batch}_D{dim}"] = ratio(("naive", batch, dim),
                                                                             ("triton", batch, dim), 0)
                headline[f"triton_speedup_vs_two_pass_B{batch}_D{dim}"] = ratio(("two_pass", batch, dim),
                                                                                ("triton", batch, dim), 0)
                headline[f"triton_memory_ratio_naive_B{batch}_D{dim}"] = ratio(("naive", batch, dim),
                                                                               ("triton", batch, dim), 1)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
