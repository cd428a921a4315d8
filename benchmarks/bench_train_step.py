"""Training-step throughput of every registered model: the eager fp32 reference, the stock recipe a user would
otherwise pick, and the engine's step with and without torch.compile.

    python benchmarks/bench_train_step.py                        # GPU: every model at base and small, batch 64
    python benchmarks/bench_train_step.py --compile              # CPU: every model at tiny, batch 8 (+ compile)
    python benchmarks/bench_train_step.py --dry-run              # CPU, tiny model, batch 2: checks every variant
    python benchmarks/bench_train_step.py --configs base --variants reference,engine --ab "name:module.attr=value"

A model's config at a scale is the shipped `<model>_<scale>` (the paper's model: `<scale>`).

Variants:
  reference       `benchmarks/reference_step.py`: ops_backend=reference, fp32 (TF32 matmuls allowed on a GPU,
                  for this variant only: the others run torch's default), PyTorch's default AdamW, eager
  stock           the recipe a user would otherwise pick: the same step under bf16 autocast, attention through SDPA
                  with a boolean mask (`reference_step.use_sdpa`), fused AdamW, torch.compile(model)
  engine          `engine.step.TrainStep`: fast ops (ops_backend=auto), AMP (bf16 on CUDA, fp32 on the CPU),
                  fused AdamW, the whole step as one CUDA graph on CUDA (eager on the CPU), batch from pinned memory
  engine+compile  the same with torch.compile(model)
  engine@<name>   the engine with A/B switches applied (module attributes set before it is built); by default
                  `overlap` (the step's OVERLAP_INPUT_COPY) and `fast` (every speed-up switch at once)
torch.compile runs only on CUDA unless --compile is given; without it `stock` runs uncompiled on the CPU and
`engine+compile` is skipped there.

Samples/s = batch / median step time, each time the mean of back-to-back steps. TFLOP/s from the analytic
`model.flops_per_sample()` (forward + backward); MFU against the vendor's dense peak for the step's dtype
(engine/observe.py; TF32 for the reference) and against the measured GEMM ceiling (bench_device.py). Peak memory on a
GPU: the allocator's peak from before the model is built to the last timed step, so it holds the weights, the
optimizer state, warm-up, compilation and the CUDA graph's pool (allocated at capture). On the CPU, variants of a
config are timed in alternation (the CPU table in benchmarks/README.md); on a GPU one after another, each on its
own, in a priority order that a --budget cuts short. Rows go to <results>/train_step.csv as they are measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _util import (Budget, Rows, add_common_args, back_to_back, ceilings, device_name, fraction,  # noqa: E402
                   measure_interleaved, parse_variants, peak_memory_mib, print_autotune_choices,
                   restore_switches, set_switches)
from reference_step import reference_optimizer, reference_train_step, use_sdpa  # noqa: E402

from mmfuse_fast.config import PretrainConfig, load_config  # noqa: E402
from mmfuse_fast.engine.observe import peak_tflops  # noqa: E402
from mmfuse_fast.engine.optim import build_optimizer  # noqa: E402
from mmfuse_fast.engine.step import TrainStep, resolve_amp  # noqa: E402
from mmfuse_fast.models import MODELS, build_model  # noqa: E402

COMPILED = ("stock", "engine+compile")
# The A/B switches of the step and the kernels (module docstrings of mmfuse_fast/engine/step.py and
# mmfuse_fast/kernels/*.py): the input copy overlapped with the replay, and every speed-up at once.
_STEP, _ATTENTION, _INFONCE = "mmfuse_fast.engine.step", "mmfuse_fast.kernels.modality_attention", \
    "mmfuse_fast.kernels.infonce"
AB_VARIANTS = [f"overlap:{_STEP}.OVERLAP_INPUT_COPY=true",
               f"fast:{_STEP}.OVERLAP_INPUT_COPY=true;{_ATTENTION}.WRAPPER=lean;{_ATTENTION}.KERNEL=static;"
               f"{_INFONCE}.COL_SUMS=relaxed_staggered"]


def config_name(model: str, scale: str) -> str:
    """The shipped config of `model` at `scale` (tiny | small | base)."""
    return scale if model == "mmfuse" else f"{model}_{scale}"


def synthetic_batch(cfg, batch: int, pin: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {m: torch.randn(batch, len(bands), cfg.model.img_size, cfg.model.img_size, generator=g)
           for m, bands in cfg.model.modalities.items()}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def load(name: str, batch: int, dry_run: bool):
    overrides = [f"train.batch_size={batch}"]
    if dry_run:  # tiny at 32 px: every op of the model runs, in seconds
        overrides += ["model.img_size=32", "model.patch_size=8"]
    return load_config(PretrainConfig, name, overrides)


def reference_like_step(cfg, device, variant: str, compile_: bool):
    """(step function, FLOPs per sample, dtype) of the eager reference or the stock recipe."""
    cfg.model.ops_backend = "reference"
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    flops = model.flops_per_sample()
    autocast = None
    if variant == "stock":
        use_sdpa(model)
        autocast = torch.bfloat16
    opt = reference_optimizer(model, cfg.optim, fused=variant == "stock" or None)
    net = torch.compile(model) if compile_ else model
    gen = torch.Generator(device).manual_seed(0)
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg, cfg.train.batch_size, False).items()}
    state = {"step": 0}

    def fn():
        reference_train_step(net, batch, opt, cfg.optim, state["step"], 10**6, gen, autocast=autocast)
        state["step"] += 1

    return fn, flops, autocast or torch.float32


def engine_step(cfg, device, compile_: bool):
    """(step function, FLOPs per sample, dtype) of the engine's TrainStep."""
    cfg.model.ops_backend = "auto"
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    flops = model.flops_per_sample()
    opt = build_optimizer(model, cfg.optim, device)
    net = torch.compile(model) if compile_ else model
    step = TrainStep(net, opt, device=device, optim_cfg=cfg.optim, total_steps=10**6, model=model,
                     amp=cfg.train.amp, cuda_graph=device.type == "cuda",
                     generator=torch.Generator(device).manual_seed(0))
    batch = synthetic_batch(cfg, cfg.train.batch_size, device.type == "cuda")
    return (lambda: step([batch])), flops, resolve_amp(cfg.train.amp, device) or torch.float32


def build(name: str, variant: str, args, device, variants: dict):
    """(step, flops per sample, dtype, compiled, switches restored by the caller)."""
    cuda = device.type == "cuda"
    compile_ = variant in COMPILED and (cuda or args.compile)
    cfg = load(name, args.batch_size, args.dry_run)
    base, _, ab = variant.partition("@")
    previous = set_switches(variants[ab]) if ab else {}
    if cuda:  # TF32 matmuls for the fp32 reference, as fp32 users run on tensor cores; torch's default elsewhere
        torch.backends.cuda.matmul.allow_tf32 = base == "reference"
    if base in ("reference", "stock"):
        step, flops, dtype = reference_like_step(cfg, device, base, compile_)
    else:
        step, flops, dtype = engine_step(cfg, device, compile_)
    return step, flops, dtype, compile_, previous


def plan(configs: list[str], variants: list[str], cheap_first: bool) -> list[tuple[str, str]]:
    """(config, variant) in the order measured. cheap_first: every uncompiled variant of every config before any
    compiled one (compilation takes the better part of a minute per model)."""
    pairs = [(c, v) for c in configs for v in variants]
    if cheap_first:
        pairs = [p for p in pairs if p[1] not in COMPILED] + [p for p in pairs if p[1] in COMPILED]
    return pairs


def figures(batch, ms, flops, dtype, device, ceiling) -> dict:
    sps = batch / (ms / 1e3)
    tflops = sps * flops / 1e12
    spec = peak_tflops(device, None if dtype == torch.float32 else dtype)
    measured = ceiling.get("gemm_tf32_tflops" if dtype == torch.float32 else "gemm_bf16_tflops")
    return {"samples_per_s": round(sps, 2), "step_ms": round(ms, 3), "tflops": round(tflops, 4),
            "mfu_spec": fraction(tflops, spec), "mfu_measured_ceiling": fraction(tflops, measured)}


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_one(name, variant, args, device, variants, rows: Rows, ceiling: dict) -> dict | None:
    """Builds, warms up and times one (config, variant) on its own; writes its row."""
    cuda = device.type == "cuda"
    _free(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    t0 = time.perf_counter()
    step, flops, dtype, compiled, previous = build(name, variant, args, device, variants)
    try:
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize(device) if cuda else None
        setup_s = time.perf_counter() - t0
        peak_cpu = None if cuda else peak_memory_mib(step, device)
        times = back_to_back(step, device, calls=args.calls, reps=args.reps, warmup=0)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else peak_cpu
    finally:
        restore_switches(previous)
    row = {"config": name, "variant": variant, "batch": args.batch_size, "dtype": dtype, "compiled": compiled,
           "cuda_graph": cuda and variant.startswith("engine"), "status": "ok",
           "switches": ";".join(variants.get(variant.partition("@")[2], [])), "p20_ms": times[0], "p50_ms": times[1],
           "p80_ms": times[2], **figures(args.batch_size, times[1], flops, dtype, device, ceiling),
           "peak_mib": None if peak is None else round(peak, 1), "setup_s": round(setup_s, 1),
           "device": device_name(device), "torch": torch.__version__}
    rows.write(row)
    print(f"{name:15s} {variant:16s} {str(dtype)[6:]:9s} p50 {times[1]:9.2f} ms  {row['samples_per_s']:9.2f} "
          f"samples/s  {row['tflops']:8.3f} TFLOP/s  MFU {row['mfu_spec']}  peak {row['peak_mib']} MiB  "
          f"setup {row['setup_s']} s", flush=True)
    print_autotune_choices()
    del step
    return row


def run_interleaved(name, variants_here, args, device, variants, rows: Rows, ceiling: dict) -> list[dict]:
    """The CPU table: every variant of one config built, then timed in alternation (a drift of the shared
    machine's speed weighs on all alike); peak = extra RSS of one step."""
    built = {v: build(name, v, args, device, variants) for v in variants_here}
    measured = measure_interleaved({v: b[0] for v, b in built.items()}, device, warmup=args.warmup,
                                   reps=args.reps)
    out = []
    for variant, (_, flops, dtype, compiled, previous) in built.items():
        restore_switches(previous)
        times, peak = measured[variant]
        row = {"config": name, "variant": variant, "batch": args.batch_size, "dtype": dtype, "compiled": compiled,
               "cuda_graph": False, "status": "ok", "p20_ms": times[0], "p50_ms": times[1], "p80_ms": times[2],
               **figures(args.batch_size, times[1], flops, dtype, device, ceiling),
               "peak_mib": None if peak is None else round(peak, 1), "device": device_name(device),
               "torch": torch.__version__}
        out.append(rows.write(row))
        print(f"{name:15s} {variant:16s} {str(dtype)[6:]:9s} p50 {times[1]:9.2f} ms  {row['samples_per_s']:9.2f} "
              f"samples/s  {row['tflops']:8.4f} TFLOP/s  peak {row['peak_mib']} MiB", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--models", nargs="+", default=None, help=f"registered models (default: all: {sorted(MODELS)})")
    p.add_argument("--scales", nargs="+", default=None, help="default: base small on CUDA, tiny on the CPU")
    p.add_argument("--configs", nargs="+", default=None, help="config names or YAML paths instead of models x "
                                                              "scales")
    p.add_argument("--variants", default=None, help="comma-separated (default: reference,stock,engine,"
                                                    "engine+compile on CUDA; reference,engine on the CPU)")
    p.add_argument("--ab", action="append", default=None, help="name:module.attr=value;... adds the variant "
                   "engine@name (repeatable; default: AB_VARIANTS where --variants is not given)")
    p.add_argument("--no-ab", action="store_true", help="no engine@ variants")
    p.add_argument("--cheap-first", action="store_true", help="every uncompiled variant before any compiled one")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU, 2 dry run")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="compile on the CPU too (slow to compile)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="timed samples")
    p.add_argument("--calls", type=int, default=None, help="back-to-back steps per timed sample (GPU)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    cuda = device.type == "cuda"
    models = args.models or ["mmfuse"] + sorted(m for m in MODELS if m != "mmfuse")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; registered: {sorted(MODELS)}")
    scales = args.scales or (["base", "small"] if cuda else ["tiny"])
    configs = args.configs or [config_name(m, s) for m in models for s in scales]
    if args.dry_run and not args.configs:
        configs = configs[:1]
    default_ab = AB_VARIANTS if (cuda or args.dry_run) and not args.variants else []
    variants = {} if args.no_ab else parse_variants(default_ab if args.ab is None else args.ab)
    chosen = args.variants.split(",") if args.variants else \
        (["reference", "engine", "stock", "engine+compile"] if cuda or args.dry_run else
         ["reference", "engine"] + (["engine+compile"] if args.compile else []))
    extra = [f"engine@{name}" for name in variants if f"engine@{name}" not in chosen]
    at = chosen.index("engine") + 1 if "engine" in chosen else len(chosen)
    chosen[at:at] = extra  # next to the engine's own row, before the variants that compile
    args.batch_size = args.batch_size or (64 if cuda else (2 if args.dry_run else 8))
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else (1 if args.dry_run else 2))
    args.reps = args.reps if args.reps is not None else (6 if cuda else (2 if args.dry_run else 12))
    args.calls = args.calls or (5 if cuda else 1)
    ceiling = ceilings(device, args.out, small=not cuda)
    rows, budget = Rows("train_step", args.out), Budget(args.budget)
    summary = {}
    if not cuda and not args.dry_run:
        for name in configs:
            for row in run_interleaved(name, chosen, args, device, variants, rows, ceiling):
                summary.setdefault(name, {})[row["variant"]] = row["samples_per_s"]
    else:
        for name, variant in plan(configs, chosen, args.cheap_first):
            common = {"config": name, "variant": variant, "batch": args.batch_size, "device": device_name(device)}
            if variant == "engine+compile" and not (cuda or args.compile):
                rows.write({**common, "status": "skipped: torch.compile runs on CUDA or with --compile"})
                continue
            if not budget.allows(45.0 if variant in COMPILED and cuda else 0.0):
                rows.write({**common, "status": budget.skip_reason()})
                continue
            try:
                row = run_one(name, variant, args, device, variants, rows, ceiling)
            except Exception as error:  # noqa: BLE001 - e.g. out of memory or a capture failure: recorded
                rows.write({**common, "status": f"failed: {type(error).__name__}: {str(error)[:200]}"})
                _free(device)
                continue
            summary.setdefault(name, {})[variant] = row["samples_per_s"]
    for name, per in summary.items():
        ref = per.get("reference")
        for variant in [v for v in per if v != "reference"]:
            if ref:
                per[f"{variant}_vs_reference"] = round(per[variant] / ref, 3)
        if per.get("stock") and per.get("engine"):
            per["engine_vs_stock"] = round(per["engine"] / per["stock"], 3)
    result = {"batch_size": args.batch_size, "device": device_name(device), "torch": torch.__version__,
              "rows": str(rows.path), "samples_per_s": summary}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
