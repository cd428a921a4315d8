"""Benchmark of `modality_attention`: the Triton kernels against the ways stock PyTorch does the same thing.

    python benchmarks/bench_modality_attention.py            # quick CPU run (Triton through the interpreter)
    python benchmarks/bench_modality_attention.py --full     # the model's real shapes (needs a GPU)

Backends, each forward and forward+backward:
  triton     the fused kernels (mmfuse_fast.kernels.modality_attention)
  reference  mmfuse_fast.ops.reference (materializes the full score matrix)
  sdpa_mask  one SDPA call over the concatenation with a boolean (B, 1, Lq, Lk) mask (off the flash path)
  sdpa_sets  one SDPA call per query set over its allowed key sets (a slice, or a concatenation when several are
             allowed; one call per allowed pair for CAF), outputs concatenated
  flex       FlexAttention with the equivalent block mask (CUDA only, when torch.nn.attention.flex_attention exists)

TFLOP/s follow flash-attention's convention, counting only allowed set pairs: forward 4·B·H·D·Σ_allowed Lq_i·Lk_j,
forward+backward 3.5× that. Rows go to benchmarks/results/modality_attention.csv; the last line printed is a JSON
object with the headline figures. On a CPU the Triton path is the interpreter: the numbers only show that it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmfuse_fast  # noqa: E402
from _util import append_rows, device_name as _device_name, measure, result_row  # noqa: E402
from mmfuse_fast.ops import modality_attention  # noqa: E402
from mmfuse_fast.ops.reference import segment_ids  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s.
DENSE_BF16_PEAK = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
                   "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def dense_peak(name: str) -> float | None:
    for key in sorted(DENSE_BF16_PEAK, key=len, reverse=True):
        if key in name:
            return DENSE_BF16_PEAK[key]
    return None


# --------------------------------------------------------------------------------------------------------------
# the competitors
# --------------------------------------------------------------------------------------------------------------


def _allowed_pairs(allow):
    return [(i, j) for i in range(allow.shape[0]) for j in range(allow.shape[1]) if bool(allow[i, j])]


def make_sdpa_mask(q_segments, kv_segments, allow, device):
    qi, _ = segment_ids(q_segments, device)
    ki, _ = segment_ids(kv_segments, device)
    mask = allow.to(device)[qi][:, ki]  # (Lq, Lk)

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run


def make_sdpa_sets(q_segments, kv_segments, allow, device):
    q_off = [0]
    for n in q_segments:
        q_off.append(q_off[-1] + n)
    k_off = [0]
    for n in kv_segments:
        k_off.append(k_off[-1] + n)
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
            outs.append(F.scaled_dot_product_attention(qs, ks, vs))
        return torch.cat(outs, 2)

    return run


def make_flex(q_segments, kv_segments, allow, device, batch, heads):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    qi, _ = segment_ids(q_segments, device)
    ki, _ = segment_ids(kv_segments, device)
    allow_d = allow.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return allow_d[qi[q_idx], ki[kv_idx]]

    block_mask = create_block_mask(mask_mod, None, None, sum(q_segments), sum(kv_segments), device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        return compiled(q, k, v, block_mask=block_mask)

    return run


def make_triton(q_segments, kv_segments, allow):
    def run(q, k, v):
        return modality_attention(q, k, v, q_segments, kv_segments, allow, backend="triton")

    return run


def make_reference(q_segments, kv_segments, allow):
    def run(q, k, v):
        return modality_attention(q, k, v, q_segments, kv_segments, allow, backend="reference")

    return run


# --------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------


def scenarios(full: bool, device):
    eye = ~torch.eye(2, dtype=torch.bool)
    if not full:
        return [
            dict(name="caf", batch=2, heads=2, d=32, qs=[33, 33], ks=[33, 33], allow=eye),
            dict(name="cmf", batch=2, heads=2, d=32, qs=[33], ks=[33, 33], allow=torch.ones(1, 2, dtype=torch.bool)),
        ]
    out = []
    for heads in (6, 12):
        out.append(dict(name=f"caf_h{heads}", batch=64, heads=heads, d=64, qs=[225, 225], ks=[225, 225], allow=eye))
        out.append(dict(name=f"encoder_h{heads}", batch=64, heads=heads, d=64, qs=[225, 225], ks=[225, 225],
                        allow=torch.ones(2, 2, dtype=torch.bool)))
        out.append(dict(name=f"cmf_h{heads}", batch=64, heads=heads, d=64, qs=[225], ks=[225, 225],
                        allow=torch.ones(1, 2, dtype=torch.bool)))
    out.append(dict(name="short_49_400", batch=64, heads=12, d=64, qs=[49, 400], ks=[49, 400], allow=eye))
    for d in (64, 128):
        out.append(dict(name=f"long_d{d}", batch=8, heads=16, d=d, qs=[1024, 1024], ks=[1024, 1024],
                        allow=torch.ones(2, 2, dtype=torch.bool)))
        out.append(dict(name=f"long_caf_d{d}", batch=8, heads=16, d=d, qs=[2048, 2048], ks=[2048, 2048],
                        allow=eye))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the model's real shapes (GPU)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--backends", default="triton,reference,sdpa_mask,sdpa_sets,flex")
    parser.add_argument("--no-save", action="store_true", help="do not append to the results CSV")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if cuda else "fp32")]
    reps = args.reps or (30 if cuda else 3)
    warmup = 5 if cuda else 1
    device_name = _device_name(device) + ("" if cuda else " (triton interpreter)")
    backends = args.backends.split(",")
    rows, headline = [], {}

    for sc in scenarios(args.full, device):
        b, h, d, qs, ks, allow = sc["batch"], sc["heads"], sc["d"], sc["qs"], sc["ks"], sc["allow"]
        allow_d = allow.to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, h, sum(qs), d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        k = torch.randn(b, h, sum(ks), d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        v = torch.randn(b, h, sum(ks), d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        do = torch.randn(b, h, sum(qs), d, device=device, dtype=dtype, generator=gen)
        pair_tokens = sum(qs[i] * ks[j] for i, j in _allowed_pairs(allow))
        flops_fwd = 4.0 * b * h * d * pair_tokens
        makers = {
            "triton": lambda: make_triton(qs, ks, allow_d),
            "reference": lambda: make_reference(qs, ks, allow_d),
            "sdpa_mask": lambda: make_sdpa_mask(qs, ks, allow, device),
            "sdpa_sets": lambda: make_sdpa_sets(qs, ks, allow, device),
            "flex": lambda: make_flex(qs, ks, allow, device, b, h) if cuda else None,
        }
        results = {}
        if "triton" in backends:  # guard: the fast path must agree with SDPA before it is timed
            with torch.no_grad():
                err = (makers["triton"]()(q, k, v).float() - makers["sdpa_mask"]()(q, k, v).float()).abs().max().item()
            print(f"# {sc['name']}: max |triton - sdpa_mask| = {err:.3g}")
            headline.setdefault(sc["name"], {})["max_abs_err_vs_sdpa"] = float(f"{err:.3g}")
        for name in backends:
            try:
                fn = makers[name]()
            except Exception as exc:  # noqa: BLE001 - an unavailable competitor is reported, not fatal
                print(f"# {sc['name']}: {name} unavailable: {exc!r}")
                continue
            if fn is None:
                continue
            for mode in ("fwd", "fwd_bwd"):
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            return fn(q, k, v)
                else:
                    def step(fn=fn):
                        return torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                try:
                    (p20, p50, p80), peak = measure(step, device, warmup, reps)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the materializing baselines
                    print(f"# {sc['name']}: {name} {mode} failed: {exc!r}")
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                flops = flops_fwd * (1.0 if mode == "fwd" else 3.5)
                tflops = flops / (p50 * 1e-3) / 1e12
                results[(name, mode)] = (p50, tflops)
                row = result_row("modality_attention", name, f"B{b}xH{h}xD{d} q{qs} kv{ks} allow{allow.int().tolist()}",
                                 dtype, device, (p20, p50, p80), peak, scenario=sc["name"], mode=mode,
                                 tflops=round(tflops, 3), version=mmfuse_fast.__version__)
                rows.append(row)
                print(f"{sc['name']:>14} {name:>10} {mode:>7}  p50 {p50:9.3f} ms  [{p20:.3f}, {p80:.3f}]  "
                      f"{tflops:8.2f} TFLOP/s  peak {row['peak_mib']} MiB")
        if cuda and ("triton", "fwd_bwd") in results:
            others = [results[(n, "fwd_bwd")][0] for n in ("sdpa_mask", "sdpa_sets", "flex") if (n, "fwd_bwd") in results]
            entry = {"fwd_bwd_ms": round(results[("triton", "fwd_bwd")][0], 4),
                     "fwd_bwd_tflops": round(results[("triton", "fwd_bwd")][1], 2),
                     "fwd_tflops": round(results[("triton", "fwd")][1], 2) if ("triton", "fwd") in results else None}
            if others:
                entry["speedup_vs_fastest_stock_fwd_bwd"] = round(min(others) / results[("triton", "fwd_bwd")][0], 3)
            fwd_others = [results[(n, "fwd")][0] for n in ("sdpa_mask", "sdpa_sets", "flex") if (n, "fwd") in results]
            if fwd_others and ("triton", "fwd") in results:
                entry["speedup_vs_fastest_stock_fwd"] = round(min(fwd_others) / results[("triton", "fwd")][0], 3)
            peak_tf = dense_peak(device_name)
            if peak_tf and dtype == torch.bfloat16:
                entry["fwd_fraction_of_dense_peak"] = round(entry["fwd_tflops"] / peak_tf, 3)
                entry["fwd_bwd_fraction_of_dense_peak"] = round(entry["fwd_bwd_tflops"] / peak_tf, 3)
            headline.setdefault(sc["name"], {}).update(entry)
        elif not cuda:
            headline.setdefault(sc["name"], {})["triton_ran"] = ("triton", "fwd_bwd") in results

    if rows and not args.no_save:
        append_rows("modality_attention", rows)
    summary = {"op": "modality_attention", "device": device_name, "dtype": str(dtype)[6:], "full": args.full,
               "triton_interpreted": not cuda, "scenarios": headline}
    if not cuda:
        summary["note"] = "CPU: the Triton path ran through the interpreter; timings are not meaningful"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
