"""Benchmark of `modality_attention`: the Triton kernels against the ways stock PyTorch does the same thing, at the
shapes the models run and at long sets, timed the way the engine runs them (inside a CUDA graph).

    python benchmarks/bench_modality_attention.py                  # GPU: model shapes + long sets, bf16
    python benchmarks/bench_modality_attention.py --dry-run        # CPU, tiny shapes, Triton interpreted
    python benchmarks/bench_modality_attention.py --ab "name:module.attr=value;module.attr=value"

Shapes (per modality 56 visible tokens of 225 at mask ratio 0.75; B = 64 and 256; `small` and `base` heads):
  stem     queries [56] over keys [56]                      encoder heads (6 / 12), head dim 64
  caf      [56, 56] over [56, 56], each set the other only  encoder heads, 64
  encoder  [56, 56] over [56, 56], all pairs                encoder heads, 64
  cmf      decoder queries [225] over keys [56, 56]         decoder heads (8 / 16), head dim 32
  decoder  [225] over [225]                                 decoder heads; and `tiny`'s 4 heads of dim 16
  long     [L, L] over [L, L], each set the other only      L = 1024, 2048; B = 8, 16 heads, head dim 64 and 128

Providers (each forward, and forward + backward):
  triton      the fused kernels (mmfuse_fast.kernels.modality_attention); `triton+<name>` with A/B switches
              applied: by default `lean` (WRAPPER=lean), `static` (KERNEL=static) and both (the kernels' docstring)
  sdpa_sets   one SDPA call per query set over its allowed key sets (the stock way: torch picks flash/cuDNN)
  sdpa_mask   one SDPA call over the concatenation with a boolean (Lq, Lk) mask
  flex        FlexAttention with the equivalent block mask, compiled once per shape; BACKEND="FLASH" where this
              torch has it (flash_attn.cute importable), else its Triton backend
  flash_attn  flash_attn_func per query set, when flash_attn is importable
  reference   the materializing PyTorch reference (CPU dry run only: it is no competitor on a GPU)

Timing: `--calls` calls captured in one CUDA graph and replayed (device time per call, p20/p50/p80), plus the host
time to issue one eager call and the eager wall time per call. TFLOP/s follow flash-attention's convention,
counting only allowed set pairs: forward 4·B·H·D·Σ_allowed Lq_i·Lk_j, forward + backward 3.5× that; the fraction
is of the measured bf16 GEMM ceiling (bench_device.py). Each row is written to <results>/modality_attention.csv the
moment it is measured; rows left when --budget is spent are written as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available() or "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (Budget, Rows, add_common_args, ceilings, device_name, fraction, graphed,  # noqa: E402
                   host_and_eager, parse_variants, print_autotune_choices, restore_switches, set_switches)

from mmfuse_fast.ops import modality_attention  # noqa: E402
from mmfuse_fast.ops.reference import segment_ids  # noqa: E402

VISIBLE = 56  # tokens per modality left visible at mask ratio 0.75 (225 patches)
PATCHES = 225
SCALES = {"small": {"enc": (6, 64), "dec": (8, 32)}, "base": {"enc": (12, 64), "dec": (16, 32)}}
# The kernels' A/B switches (module docstring of mmfuse_fast/kernels/modality_attention.py), measured next to the
# defaults unless --ab is given.
KERNELS = "mmfuse_fast.kernels.modality_attention"
AB_VARIANTS = [f"lean:{KERNELS}.WRAPPER=lean", f"static:{KERNELS}.KERNEL=static",
               f"lean_static:{KERNELS}.WRAPPER=lean;{KERNELS}.KERNEL=static"]


def _eye(n):
    return ~torch.eye(n, dtype=torch.bool)


def _ones(nq, nk):
    return torch.ones(nq, nk, dtype=torch.bool)


def scenarios(dry_run: bool) -> list[dict]:
    """In the order they are measured: what a short budget leaves out comes last."""
    if dry_run:
        return [dict(name="caf_dry", batch=1, heads=2, d=16, qs=[5, 7], ks=[5, 7], allow=_eye(2))]
    out = []
    for batch in (64, 256):
        for scale in ("base", "small"):
            (eh, ed), (dh, dd) = SCALES[scale]["enc"], SCALES[scale]["dec"]
            v = VISIBLE
            out += [dict(name=f"stem_{scale}", batch=batch, heads=eh, d=ed, qs=[v], ks=[v], allow=_ones(1, 1)),
                    dict(name=f"caf_{scale}", batch=batch, heads=eh, d=ed, qs=[v, v], ks=[v, v], allow=_eye(2)),
                    dict(name=f"encoder_{scale}", batch=batch, heads=eh, d=ed, qs=[v, v], ks=[v, v],
                         allow=_ones(2, 2)),
                    dict(name=f"cmf_{scale}", batch=batch, heads=dh, d=dd, qs=[PATCHES], ks=[v, v],
                         allow=_ones(1, 2)),
                    dict(name=f"decoder_{scale}", batch=batch, heads=dh, d=dd, qs=[PATCHES], ks=[PATCHES],
                         allow=_ones(1, 1))]
        if batch == 64:
            for length in (1024, 2048):
                for d in (64, 128):
                    out.append(dict(name=f"long{length}_d{d}", batch=8, heads=16, d=d, qs=[length, length],
                                    ks=[length, length], allow=_eye(2)))
    out.append(dict(name="decoder_tiny", batch=64, heads=4, d=16, qs=[PATCHES], ks=[PATCHES], allow=_ones(1, 1)))
    return out


# --------------------------------------------------------------------------------------------------------------
# the competitors: each maker returns fn(q, k, v) -> out, or raises when unavailable here
# --------------------------------------------------------------------------------------------------------------


def _offsets(segments):
    off = [0]
    for n in segments:
        off.append(off[-1] + n)
    return off


def per_set(attend, q_segments, kv_segments, allow):
    """fn(q, k, v) calling attend(q_i, k_i, v_i) once per query set over its allowed key sets (B, H, L, D)."""
    q_off, k_off = _offsets(q_segments), _offsets(kv_segments)
    allowed = [[j for j in range(len(kv_segments)) if bool(allow[i, j])] for i in range(len(q_segments))]

    def run(q, k, v):
        outs = []
        for i, js in enumerate(allowed):
            qs = q[:, :, q_off[i]:q_off[i + 1]]
            if not js:
                outs.append(torch.zeros_like(qs))
                continue
            if js == list(range(js[0], js[-1] + 1)):  # adjacent sets: one slice, no copy
                ks, vs = k[:, :, k_off[js[0]]:k_off[js[-1] + 1]], v[:, :, k_off[js[0]]:k_off[js[-1] + 1]]
            else:
                ks = torch.cat([k[:, :, k_off[j]:k_off[j + 1]] for j in js], 2)
                vs = torch.cat([v[:, :, k_off[j]:k_off[j + 1]] for j in js], 2)
            outs.append(attend(qs, ks, vs))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    return run


def make_sdpa_sets(sc, device):
    return per_set(F.scaled_dot_product_attention, sc["qs"], sc["ks"], sc["allow"])


def make_sdpa_mask(sc, device):
    qi, _ = segment_ids(sc["qs"], device)
    ki, _ = segment_ids(sc["ks"], device)
    mask = sc["allow"].to(device)[qi][:, ki]
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def make_flash_attn(sc, device):
    from flash_attn import flash_attn_func

    def attend(q, k, v):  # flash_attn takes (B, L, H, D)
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return per_set(attend, sc["qs"], sc["ks"], sc["allow"])


def flex_backend() -> str:
    return "FLASH" if importlib.util.find_spec("flash_attn") and importlib.util.find_spec("flash_attn.cute") \
        else "TRITON"


def make_flex(sc, device):
    if device.type != "cuda":
        raise RuntimeError("compiled FlexAttention needs CUDA here (the CPU compile would exceed the dry run)")
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # one compiled graph per shape: without a higher limit dynamo falls back to eager after 8 shapes
    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 256)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    qi, _ = segment_ids(sc["qs"], device)
    ki, _ = segment_ids(sc["ks"], device)
    allow = sc["allow"].to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return allow[qi[q_idx], ki[kv_idx]]

    block_mask = create_block_mask(mask_mod, None, None, sum(sc["qs"]), sum(sc["ks"]), device=device)
    options = {"BACKEND": flex_backend()} if flex_backend() == "FLASH" else None
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, kernel_options=options)


def make_triton(sc, device):
    allow = sc["allow"].to(device)
    return lambda q, k, v: modality_attention(q, k, v, sc["qs"], sc["ks"], allow, backend="triton")


def make_reference(sc, device):
    allow = sc["allow"].to(device)
    return lambda q, k, v: modality_attention(q, k, v, sc["qs"], sc["ks"], allow, backend="reference")


MAKERS = {"triton": make_triton, "sdpa_sets": make_sdpa_sets, "sdpa_mask": make_sdpa_mask, "flex": make_flex,
          "flash_attn": make_flash_attn, "reference": make_reference}


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------


def pair_tokens(sc) -> int:
    return sum(sc["qs"][i] * sc["ks"][j] for i in range(len(sc["qs"])) for j in range(len(sc["ks"]))
               if bool(sc["allow"][i, j]))


def calls_for(eager_ms: float, dry_run: bool) -> int:
    """Calls per captured graph: enough for a replay of a few milliseconds, so launch gaps are averaged over."""
    if dry_run:
        return 1
    return int(min(64, max(4, math.ceil(4.0 / max(eager_ms, 1e-3)))))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--providers", default=None, help="comma-separated (default: all that exist here)")
    parser.add_argument("--only", default=None, help="comma-separated scenario name prefixes")
    parser.add_argument("--ab", action="append", default=None, help="name:module.attr=value;... (repeatable; "
                        "default: the kernels' A/B switches, AB_VARIANTS)")
    parser.add_argument("--no-ab", action="store_true", help="the default kernels only")
    parser.add_argument("--reps", type=int, default=None, help="graph replays timed (default 20)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = args.reps or (20 if cuda else 2)
    budget = Budget(args.budget)
    rows = Rows("modality_attention", args.out)
    name = device_name(device) + ("" if cuda else " (triton interpreter)")
    ceiling = ceilings(device, args.out, small=not cuda).get("gemm_bf16_tflops" if cuda else "gemm_tf32_tflops")
    default = ["triton", "sdpa_sets", "sdpa_mask", "flex"] + (["flash_attn"] if importlib.util.find_spec(
        "flash_attn") else []) + ([] if cuda else ["reference"])
    providers = args.providers.split(",") if args.providers else default
    variants = {} if args.no_ab else parse_variants(AB_VARIANTS if args.ab is None else args.ab)
    if "triton" in providers:
        providers = providers + [f"triton+{v}" for v in variants]
    headline = {}

    for sc in scenarios(args.dry_run):
        if args.only and not any(sc["name"].startswith(p) for p in args.only.split(",")):
            continue
        b, h, d, qs, ks = sc["batch"], sc["heads"], sc["d"], sc["qs"], sc["ks"]
        shape = f"B{b} H{h} D{d} q{qs} kv{ks} allow{sc['allow'].int().tolist()}"
        flops_fwd = 4.0 * b * h * d * pair_tokens(sc)
        common = dict(scenario=sc["name"], shape=shape, dtype=dtype, device=name)
        if not budget.allows():
            for provider in providers:
                rows.write({**common, "provider": provider, "status": budget.skip_reason()})
            continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(device, dtype)
                       for n in (sum(qs), sum(ks), sum(ks), sum(qs)))
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        with torch.no_grad():
            expected = make_sdpa_mask(sc, device)(q, k, v).float()
        entry = headline.setdefault(sc["name"], {})
        for provider in providers:
            base, _, variant = provider.partition("+")
            if not budget.allows(20.0 if base == "flex" else 0.0):
                rows.write({**common, "provider": provider, "status": budget.skip_reason()})
                continue
            previous = set_switches(variants[variant]) if variant else {}
            try:
                t0 = time.perf_counter()
                fn = MAKERS[base](sc, device)
                with torch.no_grad():
                    err = (fn(q, k, v).float() - expected).abs().max().item()  # also compiles / autotunes
                torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                setup_s = time.perf_counter() - t0
            except Exception as error:  # noqa: BLE001 - an unavailable competitor is recorded, not fatal
                rows.write({**common, "provider": provider, "status": f"unavailable: {type(error).__name__}: "
                                                                        f"{str(error)[:160]}"})
                restore_switches(previous)
                continue
            for mode in ("fwd", "fwd_bwd"):
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(q, k, v)
                else:
                    def step(fn=fn):
                        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                try:
                    _, eager_ms = host_and_eager(step, device, 1)
                    timing = graphed(step, device, calls_for(eager_ms, args.dry_run), reps=reps,
                                     warmup=1 if args.dry_run else 3)
                except Exception as error:  # noqa: BLE001 - e.g. out of memory: the row says so
                    rows.write({**common, "provider": provider, "mode": mode,
                                "status": f"failed: {type(error).__name__}: {str(error)[:160]}"})
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                ms = timing.get("graph_p50_ms", timing.get("eager_p50_ms", timing["eager_ms"]))
                tflops = flops_fwd * (1.0 if mode == "fwd" else 3.5) / (ms * 1e-3) / 1e12
                row = rows.write({**common, "provider": provider, "mode": mode, "status": "ok",
                                  "switches": ";".join(variants.get(variant, [])), **timing,
                                  "tflops": tflops, "fraction_of_ceiling": fraction(tflops, ceiling),
                                  "max_abs_err_vs_sdpa_mask": err, "setup_s": round(setup_s, 2),
                                  "flex_backend": flex_backend() if base == "flex" else ""})
                entry[f"{provider}_{mode}_ms"] = round(ms, 4)
                print(f"{sc['name']:>16} {provider:>14} {mode:>7}  {ms:9.4f} ms/call  host {row['host_us']:8.1f} µs"
                      f"  {tflops:8.2f} TFLOP/s  err {err:.2g}", flush=True)
            restore_switches(previous)
        _speedups(entry)
        print_autotune_choices()
        del q, k, v, do, expected
        if cuda:
            torch.cuda.empty_cache()

    summary = {"op": "modality_attention", "device": name, "dtype": str(dtype)[6:], "ceiling_tflops": ceiling,
               "rows": str(rows.path), "scenarios": headline}
    print(json.dumps(summary))
    return summary


def _speedups(entry: dict) -> None:
    for mode in ("fwd", "fwd_bwd"):
        mine = entry.get(f"triton_{mode}_ms")
        stock = [entry[f"{p}_{mode}_ms"] for p in ("sdpa_sets", "sdpa_mask", "flex", "flash_attn")
                 if f"{p}_{mode}_ms" in entry]
        if mine and stock:
            entry[f"speedup_vs_fastest_stock_{mode}"] = round(min(stock) / mine, 3)


if __name__ == "__main__":
    main()
