"""Training-step throughput of every registered model: the eager fp32 reference step vs the engine's step.

    python benchmarks/bench_train_step.py                                  # CPU quick run: every model at tiny
    python benchmarks/bench_train_step.py --scales tiny small base         # on a GPU (adds --compile rows there)
    python benchmarks/bench_train_step.py --models mmfuse satvit --configs my.yaml

A model's config at a scale is the shipped `<model>_<scale>` (the paper's model: `<scale>`).

Rows per config:
  reference      `benchmarks/reference_step.py`: model with ops_backend=reference, fp32, foreach AdamW, eager
  engine         `engine.step.TrainStep`: fast ops (ops_backend=auto), AMP (bf16 on CUDA, fp32 on the CPU),
                 fused AdamW, the whole step as a CUDA graph on CUDA (eager on the CPU), batch from pinned memory
  engine+compile the same with torch.compile(model) (default on CUDA; on the CPU only with --compile)

Samples/s = batch / median step time. TFLOP/s and MFU from the analytic `model.flops_per_sample()` (forward +
backward) and the device's dense bf16 (or fp32) peak (engine/observe.py; MFU is null on the CPU). Rows are appended
to benchmarks/results/train_step.csv; the last line is a JSON object with `speedup_vs_reference` (engine /
reference samples/s for the paper's model at the first scale) and the per-config figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _util import append_rows, device_name, measure_interleaved, result_row  # noqa: E402
from reference_step import reference_optimizer, reference_train_step  # noqa: E402

from mmfuse_fast.config import PretrainConfig, load_config  # noqa: E402
from mmfuse_fast.engine.observe import peak_tflops  # noqa: E402
from mmfuse_fast.engine.optim import build_optimizer  # noqa: E402
from mmfuse_fast.engine.step import TrainStep, resolve_amp  # noqa: E402
from mmfuse_fast.models import MODELS, build_model  # noqa: E402


def config_name(model: str, scale: str) -> str:
    """The shipped config of `model` at `scale` (tiny | small | base)."""
    return scale if model == "mmfuse" else f"{model}_{scale}"


def synthetic_batch(cfg, batch: int, pin: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {m: torch.randn(batch, len(bands), cfg.model.img_size, cfg.model.img_size, generator=g)
           for m, bands in cfg.model.modalities.items()}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def reference_step(cfg, batch_cpu, device):
    """(step function, FLOPs per sample) of the eager fp32 reference step."""
    cfg.model.ops_backend = "reference"
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = reference_optimizer(model, cfg.optim)  # plain AdamW, as a user would write it
    if device.type == "cuda":
        opt = torch.optim.AdamW(opt.param_groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    gen = torch.Generator(device).manual_seed(0)
    batch = {k: v.to(device) for k, v in batch_cpu.items()}
    state = {"step": 0}

    def fn():
        reference_train_step(model, batch, opt, cfg.optim, state["step"], 10**6, gen)
        state["step"] += 1

    return fn, model.flops_per_sample()


def engine_step(cfg, batch_cpu, device, compile_: bool):
    """(step function, FLOPs per sample) of the engine's TrainStep."""
    cfg.model.ops_backend = "auto"
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    flops = model.flops_per_sample()
    opt = build_optimizer(model, cfg.optim, device)
    net = torch.compile(model) if compile_ else model
    step = TrainStep(net, opt, device=device, optim_cfg=cfg.optim, total_steps=10**6, model=model,
                     amp=cfg.train.amp, cuda_graph=device.type == "cuda",
                     generator=torch.Generator(device).manual_seed(0))
    return lambda: step([batch_cpu]), flops


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"registered models (default: all: {sorted(MODELS)})")
    p.add_argument("--scales", nargs="+", default=None, help="default: tiny on the CPU, tiny small base on CUDA")
    p.add_argument("--configs", nargs="+", default=None, help="config names or YAML paths instead of models x "
                                                              "scales")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on the CPU, 64 on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="add engine+compile rows on the CPU (slow to compile)")
    p.add_argument("--no-compile", action="store_true", help="no engine+compile rows on CUDA")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/train_step.csv")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    models = args.models or ["mmfuse"] + sorted(m for m in MODELS if m != "mmfuse")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; registered: {sorted(MODELS)}")
    scales = args.scales or (["tiny", "small", "base"] if cuda else ["tiny"])
    configs = args.configs or [config_name(m, s) for s in scales for m in models]
    batch = args.batch_size or (64 if cuda else 8)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    reps = args.reps if args.reps is not None else (30 if cuda else 12)
    with_compile = (cuda and not args.no_compile) or args.compile
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32

    rows, summary = [], {}
    for name in configs:
        cfg = load_config(PretrainConfig, name, [f"train.batch_size={batch}"])
        amp = resolve_amp(cfg.train.amp, device)
        variants = [("reference", None), ("engine", False)] + ([("engine+compile", True)] if with_compile else [])
        per, steps = {}, {}
        for variant, compile_ in variants:
            pin = cuda and variant != "reference"
            b = synthetic_batch(cfg, batch, pin)
            if variant == "reference":
                steps[variant] = reference_step(load_config(PretrainConfig, name, [f"train.batch_size={batch}"]),
                                                b, device)
            else:
                steps[variant] = engine_step(cfg, b, device, compile_)
        # Timed in alternation: on a shared machine a drift in speed would otherwise favour whichever ran first.
        measured = measure_interleaved({v: fn for v, (fn, _) in steps.items()}, device, warmup=warmup, reps=reps)
        for variant, _ in variants:
            (times, peak), flops = measured[variant], steps[variant][1]
            dtype = torch.float32 if variant == "reference" else (amp or torch.float32)
            peak_tf = peak_tflops(device, None if variant == "reference" else amp)
            sps = batch / (times[1] / 1e3)
            tflops = sps * flops / 1e12
            mfu = tflops / peak_tf if peak_tf else None
            per[variant] = {"samples_per_s": round(sps, 2), "tflops": round(tflops, 4),
                            "mfu": None if mfu is None else round(mfu, 4),
                            "peak_mib": None if peak is None else round(peak, 1)}
            row = result_row("train_step", variant, f"{name} b{batch}", dtype, device, times, peak,
                             samples_per_s=round(sps, 2), tflops=round(tflops, 4),
                             mfu=None if mfu is None else round(mfu, 4), cuda_graph=cuda and variant != "reference")
            rows.append(row)
            print(f"{name:13s} {variant:15s} {str(dtype).replace('torch.', ''):9s} p50 {times[1]:9.2f} ms  "
                  f"{sps:9.2f} samples/s  {tflops:8.4f} TFLOP/s  MFU {mfu if mfu is None else f'{mfu:.1%}'}  "
                  f"peak {per[variant]['peak_mib']} MiB", flush=True)
        ref = per["reference"]["samples_per_s"]
        per["speedup_vs_reference"] = round(per["engine"]["samples_per_s"] / ref, 3)
        if "engine+compile" in per:
            per["speedup_compile_vs_reference"] = round(per["engine+compile"]["samples_per_s"] / ref, 3)
        summary[name] = per
    if not args.no_save:
        append_rows("train_step", rows)
    first = next((c for c in configs if load_config(PretrainConfig, c).model.name == "mmfuse"), configs[0])
    result = {"speedup_vs_reference": summary[first]["speedup_vs_reference"], "config": first,
              "batch_size": batch, "device": device_name(device), "torch": torch.__version__, "results": summary}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
