"""Benchmark of `multiscale_infonce` (forward + backward): time and peak extra memory against the batch size.

    python benchmarks/bench_infonce.py                   # GPU: B 4k, 16k, 64k; D 128, 256; fp32 and bf16
    python benchmarks/bench_infonce.py --dry-run         # CPU, tiny sizes, Triton interpreted
    python benchmarks/bench_infonce.py --device cpu      # the CPU table: naive vs chunked, B 1k -> 16k, fp32
    python benchmarks/bench_infonce.py --ab "name:module.attr=value;module.attr=value"

Providers (S = 2 scales, τ = 0.1, L2-normalized inputs, symmetric loss):
  fused       backend="triton": one fused pass for both softmax directions, forward and backward;
              `fused+<name>` with A/B switches applied: by default COL_SUMS=relaxed, =relaxed_staggered and
              BWD_DA_ATOMIC=True (the kernels' docstring)
  two_pass    the Inf-CL approach: two one-direction tiled passes (the Triton kernels with symmetric=False,
              anchors->views and views->anchors), averaged; the same loss
  naive_fp32  the S x B x B logits materialized in fp32 (inputs upcast), cross-entropy both ways
  naive_bf16  the same with bf16 logits (inputs cast to bf16, as autocast would): the fair fast baseline
  chunked     backend="chunked": the memory-linear PyTorch path (CPU default; on a GPU with --providers)
  naive       backend="reference" (the CPU table's baseline)
The input dtype is that of the embeddings the loss receives: fp32 (what the model sends) and bf16.

On a GPU each configuration is timed inside a CUDA graph (forward + backward captured and replayed) and its peak
memory is the CUDA allocator's peak over what was allocated before the call; OOM is a row, not a failure. On the
CPU (the table in benchmarks/README.md) every configuration runs in its own subprocess, the peak extra memory is
the peak RSS minus the RSS before the call, and torch's CPU allocator is asked for transparent huge pages
(THP_MEM_ALLOC_ENABLE=1, the same for every provider; --no-thp to disable). Rows go to <results>/infonce.csv as
they are measured; the last printed line is a JSON object with the headline ratios.
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

if not torch.cuda.is_available() or "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (Budget, Rows, add_common_args, device_name, graphed, parse_variants,  # noqa: E402
                   peak_memory_mib, quantiles, restore_switches, set_switches)

from mmfuse_fast.ops import multiscale_infonce  # noqa: E402

TEMPERATURE = 0.1
# The kernels' A/B switches (module docstring of mmfuse_fast/kernels/infonce.py), measured next to the defaults
# unless --ab is given.
KERNELS = "mmfuse_fast.kernels.infonce"
AB_VARIANTS = [f"relaxed:{KERNELS}.COL_SUMS=relaxed", f"relaxed_staggered:{KERNELS}.COL_SUMS=relaxed_staggered",
               f"da_atomic:{KERNELS}.BWD_DA_ATOMIC=true"]


def naive_loss(anchors, views, logits_dtype):
    """The loss as a user would write it: one S x B x B logits tensor, cross-entropy over rows and columns."""
    a, v = anchors.to(logits_dtype), views.to(logits_dtype)
    logits = torch.bmm(a, v.transpose(1, 2)) / TEMPERATURE
    n_scales, batch, _ = logits.shape
    target = torch.arange(batch, device=logits.device).repeat(n_scales)
    rows = F.cross_entropy(logits.flatten(0, 1), target)
    cols = F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target)
    return 0.5 * (rows + cols)


def make_loss(provider: str, anchors, views):
    if provider == "two_pass":
        def loss_fn():
            forward = multiscale_infonce(anchors, views, TEMPERATURE, symmetric=False, backend="triton")
            backward = multiscale_infonce(views, anchors, TEMPERATURE, symmetric=False, backend="triton")
            return 0.5 * (forward + backward)
        return loss_fn
    if provider in ("naive_fp32", "naive_bf16"):
        logits_dtype = torch.float32 if provider == "naive_fp32" else torch.bfloat16
        return lambda: naive_loss(anchors, views, logits_dtype)
    backend = {"naive": "reference", "chunked": "chunked", "fused": "triton"}[provider]
    return lambda: multiscale_infonce(anchors, views, TEMPERATURE, symmetric=True, backend=backend)


def make_step(provider, n_scales, batch, dim, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    views = F.normalize(torch.randn(n_scales, batch, dim, generator=gen), dim=-1).to(device, dtype)
    anchors = F.normalize(torch.randn(n_scales, batch, dim, generator=gen), dim=-1).to(device, dtype)
    anchors.requires_grad_()
    views.requires_grad_()
    loss_fn = make_loss(provider.partition("+")[0], anchors, views)

    def step():
        torch.autograd.grad(loss_fn(), (anchors, views))

    return step, loss_fn


# --------------------------------------------------------------------------------------------------------------
# GPU (and the dry run): in-process, graphed, rows written as measured
# --------------------------------------------------------------------------------------------------------------


def run_device(args, device, rows: Rows, budget: Budget, variants: dict) -> dict:
    cuda = device.type == "cuda"
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([4096, 16384, 65536] if cuda else [32])
    dims = [int(d) for d in args.dims.split(",")] if args.dims else ([128, 256] if cuda else [16])
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else \
        ([torch.float32, torch.bfloat16] if cuda else [torch.float32])
    providers = args.providers.split(",") if args.providers else ["fused", "two_pass", "naive_fp32", "naive_bf16"]
    if "fused" in providers:
        providers += [f"fused+{v}" for v in variants]
    reps = args.reps or (10 if cuda else 2)
    results = {}
    for dtype in dtypes:
        for batch in sizes:
            for dim in dims:
                shape = f"S={args.scales} B={batch} D={dim}"
                common = dict(shape=shape, dtype=dtype, device=device_name(device))
                reference_loss = None
                for provider in providers:
                    if not budget.allows():
                        rows.write({**common, "provider": provider, "status": budget.skip_reason()})
                        continue
                    variant = provider.partition("+")[2]
                    previous = set_switches(variants[variant]) if variant else {}
                    try:
                        step, loss_fn = make_step(provider, args.scales, batch, dim, dtype, device)
                        with torch.no_grad():
                            loss = loss_fn().item()  # also compiles the kernels
                        if cuda:
                            step()  # the backward kernels compile outside the memory measurement
                        peak = peak_memory_mib(step, device)
                        timing = graphed(step, device, calls=1, reps=reps, warmup=1 if cuda else 0)
                    except torch.OutOfMemoryError:
                        rows.write({**common, "provider": provider, "status": "out of memory"})
                        restore_switches(previous)
                        torch.cuda.empty_cache()
                        continue
                    except Exception as error:  # noqa: BLE001 - recorded; the other providers still run
                        rows.write({**common, "provider": provider,
                                    "status": f"failed: {type(error).__name__}: {str(error)[:160]}"})
                        restore_switches(previous)
                        if cuda:
                            torch.cuda.empty_cache()
                        continue
                    restore_switches(previous)
                    if reference_loss is None:
                        reference_loss = loss
                    ms = timing.get("graph_p50_ms", timing.get("eager_p50_ms", timing["eager_ms"]))
                    rows.write({**common, "provider": provider, "status": "ok",
                                "switches": ";".join(variants.get(variant, [])), **timing,
                                "peak_mib": None if peak is None else round(peak, 1), "loss": loss,
                                "loss_minus_first_provider": loss - reference_loss})
                    results[(provider, batch, dim, str(dtype)[6:])] = (ms, peak)
                    print(f"{provider:>12} {str(dtype)[6:]:>8} B={batch:>6} D={dim:>4}  {ms:9.3f} ms  "
                          f"peak {peak if peak is None else round(peak, 1)} MiB  loss {loss:.6f}", flush=True)
                    del step, loss_fn
                    if cuda:
                        torch.cuda.empty_cache()
    headline = {}
    for (provider, batch, dim, dt), (ms, peak) in results.items():
        if provider != "fused":
            continue
        for other in ("two_pass", "naive_fp32", "naive_bf16"):
            theirs = results.get((other, batch, dim, dt))
            if theirs:
                headline[f"speedup_vs_{other}_B{batch}_D{dim}_{dt}"] = round(theirs[0] / ms, 3)
                if peak and theirs[1]:
                    headline[f"memory_ratio_{other}_B{batch}_D{dim}_{dt}"] = round(theirs[1] / peak, 2)
    return headline


# --------------------------------------------------------------------------------------------------------------
# the CPU table: one subprocess per configuration, peak RSS
# --------------------------------------------------------------------------------------------------------------


def run_config_cpu(provider, n_scales, batch, dim, dtype, reps, budget_s):
    step, _ = make_step(provider, n_scales, batch, dim, dtype, torch.device("cpu"))

    def timed():
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    times = []
    deadline = time.perf_counter() + budget_s
    peak = peak_memory_mib(lambda: times.append(timed()), torch.device("cpu"))  # the first sample is timed too
    while len(times) < reps and time.perf_counter() < deadline:
        times.append(timed())
    return sorted(times), peak


def worker(spec: str) -> None:
    provider, n_scales, batch, dim, dtype, reps, budget = spec.split(",")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    times, peak = run_config_cpu(provider, int(n_scales), int(batch), int(dim), getattr(torch, dtype), int(reps),
                                 float(budget))
    print(json.dumps({"times": times, "peak": peak}))


def run_cpu_table(args, rows: Rows, budget: Budget) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1024, 2048, 4096, 8192, 16384]
    dims = [int(d) for d in args.dims.split(",")] if args.dims else [128, 256]
    providers = args.providers.split(",") if args.providers else ["naive", "chunked"]
    results = {}
    for dim in dims:
        for batch in sizes:
            if dim == 256 and batch > args.max_size_256:
                continue
            for provider in providers:
                common = dict(provider=provider, shape=f"S={args.scales} B={batch} D={dim}", dtype="float32",
                              device=device_name(torch.device("cpu")))
                if not budget.allows():
                    rows.write({**common, "status": budget.skip_reason()})
                    continue
                spec = ",".join(map(str, (provider, args.scales, batch, dim, "float32", args.reps or 3, 1.5)))
                out = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                                     cwd=ROOT)
                if out.returncode != 0:
                    rows.write({**common, "status": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]})
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                p20, p50, p80 = quantiles(result["times"])
                rows.write({**common, "status": "ok", "p20_ms": p20, "p50_ms": p50, "p80_ms": p80,
                            "peak_mib": result["peak"], "n_timed": len(result["times"])})
                results[(provider, batch, dim)] = (p50, result["peak"])
                print(f"{provider:>9} {batch:>6} {dim:>4} p50 {p50:10.2f} ms  peak {result['peak']} MiB", flush=True)

    def ratio(num, den, index):
        a, b = results.get(num), results.get(den)
        return None if not a or not b or not a[index] or not b[index] else round(a[index] / b[index], 3)

    return {"memory_ratio_16k": ratio(("naive", 16384, 128), ("chunked", 16384, 128), 1),
            "time_ratio_16k": ratio(("chunked", 16384, 128), ("naive", 16384, 128), 0)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default=None, help="cuda (default where present) or cpu (the CPU table)")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes")
    parser.add_argument("--dims", default=None, help="comma-separated embedding sizes")
    parser.add_argument("--dtypes", default=None, help="comma-separated input dtypes (GPU: float32,bfloat16)")
    parser.add_argument("--max-size-256", type=int, default=2048, help="CPU table: largest B measured at D=256")
    parser.add_argument("--scales", type=int, default=2)
    parser.add_argument("--providers", default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--ab", action="append", default=None, help="name:module.attr=value;... (repeatable; "
                        "default: the kernels' A/B switches, AB_VARIANTS)")
    parser.add_argument("--no-ab", action="store_true", help="the default kernels only")
    parser.add_argument("--no-thp", action="store_true", help="do not enable transparent huge pages (CPU)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    rows, budget = Rows("infonce", args.out), Budget(args.budget)
    variants = {} if args.no_ab else parse_variants(AB_VARIANTS if args.ab is None else args.ab)
    if device.type == "cuda" or args.dry_run:
        headline = run_device(args, device, rows, budget, variants)
    else:
        headline = run_cpu_table(args, rows, budget)
    summary = {"op": "multiscale_infonce", "device": device_name(device), "rows": str(rows.path), **headline}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
