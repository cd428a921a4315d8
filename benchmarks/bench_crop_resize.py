"""Benchmark of `crop_resize`: the C++/CUDA extension against the ways stock PyTorch does the same thing.

    python benchmarks/bench_crop_resize.py                  # GPU: fp32 and bf16; CPU: the fp32 table
    python benchmarks/bench_crop_resize.py --dry-run        # CPU, tiny sizes: checks that every path runs

The cross-scale branch crops every scene (all bands) at random boxes and resizes the crops back to the input size;
N = 256 scenes, C = 14 bands, 120 px, 1 and 2 crops per scene (K = N and 2N boxes, box_index = arange(N)
repeated). Backends:
  extension    torch.ops.mmfuse.crop_resize (csrc/), the package's default when built
  grid_sample  the pure-PyTorch fallback (ops/reference.py): gather the images, one grid_sample
  loop         per box F.interpolate of the integer-rounded crop (what a per-sample RandomResizedCrop does;
               it needs the boxes on the host, so this timing includes that copy)
  roi_align    torchvision.ops.roi_align(aligned=True, sampling_ratio=1), where torchvision is installed and
               accepts the dtype (its boxes then share the images' dtype)
Forward, and forward + backward for extension and grid_sample. A time is the mean over `--calls` back-to-back
calls (p20/p50/p80 over `--reps` such runs). Bandwidth counts the bytes the op must move: each box's source window
(the pixels its samples touch) read once plus the output written; on a GPU it is also given as a fraction of the
measured copy bandwidth (bench_device.py) and of the vendor figure.

On this project's CPU VMs a page fault costs several microseconds, so the time of every backend is dominated by
first-touching its freshly allocated output; the script therefore enables torch's transparent-huge-page allocation
(THP_MEM_ALLOC_ENABLE=1, the same for all backends) unless --no-thp is given. Rows go to <results>/crop_resize.csv as
they are measured; the last printed line is a JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator at its first allocation

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (SPEC_BANDWIDTH_GBPS, Budget, Rows, add_common_args, back_to_back, ceilings,  # noqa: E402
                   device_name, fraction, spec_value)

from mmfuse_fast.ops import _extension, crop_resize, random_boxes  # noqa: E402
from mmfuse_fast.ops.reference import crop_resize_reference  # noqa: E402

def bytes_moved(images, boxes, box_index, size) -> int:
    """Bytes read (each box's source window: the pixels its bilinear samples touch) plus bytes written."""
    _, channels, height, width = images.shape
    out_h, out_w = size

    def extent(lo, hi, n_out, n_in):
        s = lo[:, None] + (torch.arange(n_out, dtype=torch.float64) + 0.5) * ((hi - lo) / n_out)[:, None] - 0.5
        s = s.clamp(0, n_in - 1)
        first = s.min(1).values.floor()
        last = (s.max(1).values.floor() + 1).clamp(max=n_in - 1)
        return last - first + 1

    b = boxes.double().cpu()
    window = extent(b[:, 0], b[:, 2], out_w, width) * extent(b[:, 1], b[:, 3], out_h, height)
    elem = images.element_size()
    return int(window.sum()) * channels * elem + boxes.shape[0] * channels * out_h * out_w * elem


def make_loop(size):
    def run(images, boxes, box_index):
        crops = []
        for (x1, y1, x2, y2), n in zip(boxes.round().long().tolist(), box_index.tolist()):
            crops.append(F.interpolate(images[n:n + 1, :, y1:y2, x1:x2], size=size, mode="bilinear",
                                       align_corners=False))
        return torch.cat(crops)
    return run


def make_roi_align(size):
    try:
        from torchvision.ops import roi_align
    except ImportError:
        return None

    def run(images, boxes, box_index):
        rois = torch.cat([box_index[:, None].to(images.dtype), boxes.to(images.dtype)], 1)
        return roi_align(images, rois, size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    parser.add_argument("--n", type=int, default=None, help="scenes (default 256)")
    parser.add_argument("--channels", type=int, default=None, help="all bands of all modalities (default 14)")
    parser.add_argument("--size", type=int, default=None, help="input and output side (default 120)")
    parser.add_argument("--crops", type=int, nargs="+", default=[1, 2], help="crops per scene")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: float32,bfloat16 on a GPU, "
                                                       "float32 on the CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default 5 CPU, 20 GPU)")
    parser.add_argument("--calls", type=int, default=None, help="back-to-back calls per timed run (GPU 20)")
    parser.add_argument("--loop-reps", type=int, default=2, help="timed runs of the slow per-box loop")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--no-thp", action="store_true", help="leave torch's CPU allocator at 4 KiB pages")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    cuda = device.type == "cuda"
    n, channels, side = (args.n or (4 if args.dry_run else 256), args.channels or (2 if args.dry_run else 14),
                         args.size or (16 if args.dry_run else 120))
    reps = args.reps or (20 if cuda else (2 if args.dry_run else 5))
    calls = args.calls or (20 if cuda else 1)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else \
        ([torch.float32, torch.bfloat16] if cuda else [torch.float32])
    size = (side, side)
    name = device_name(device)
    copy_gbps = ceilings(device, args.out, small=not cuda)["copy_tbps"] * 1e3 if cuda else None
    spec_gbps = spec_value(SPEC_BANDWIDTH_GBPS, name) if cuda else None
    has_ext = _extension.has_kernel("crop_resize", device.type)
    roi = make_roi_align(size)
    rows, budget, headline = Rows("crop_resize", args.out), Budget(args.budget), {}
    torch.manual_seed(0)
    for dtype in dtypes:
        images = torch.randn(n, channels, side, side, device=device).to(dtype)
        for crops in args.crops:
            boxes = random_boxes(n * crops, side, side, device=device)
            box_index = torch.arange(n, device=device).repeat(crops)
            moved = bytes_moved(images, boxes, box_index, size)
            shape = f"N={n} C={channels} {side}x{side}->{size[0]}x{size[1]} K={len(boxes)}"
            common = dict(shape=shape, dtype=dtype, device=name, extension_built=has_ext)
            backends = {}
            if has_ext:
                backends["extension"] = lambda: crop_resize(images, boxes, size, box_index, backend="extension")
            backends["grid_sample"] = lambda: crop_resize_reference(images, boxes, size, box_index)
            backends["loop"] = lambda: make_loop(size)(images, boxes, box_index)
            if roi is not None:
                backends["roi_align"] = lambda: roi(images, boxes, box_index)
            if not args.no_backward:
                grad = torch.randn(len(boxes), channels, *size, device=device).to(dtype)
                x = images.detach().requires_grad_(True)
                for backend in [b for b in ("extension", "grid_sample") if b in backends]:
                    def step(be="extension" if backend == "extension" else "reference"):
                        x.grad = None
                        crop_resize(x, boxes, size, box_index, backend=be).backward(grad)
                    backends[backend + "+bwd"] = step
            times = {}
            for backend, fn in backends.items():
                provider, _, bwd = backend.partition("+")
                mode = "fwd_bwd" if bwd else "fwd"
                if not budget.allows():
                    rows.write({**common, "provider": provider, "mode": mode, "status": budget.skip_reason()})
                    continue
                slow = provider == "loop"
                try:
                    t = back_to_back(fn, device, 1 if slow else calls, min(reps, args.loop_reps) if slow else reps)
                except Exception as error:  # noqa: BLE001 - e.g. roi_align refusing a dtype: recorded
                    rows.write({**common, "provider": provider, "mode": mode,
                                "status": f"unavailable: {type(error).__name__}: {str(error)[:160]}"})
                    continue
                times[backend] = t[1]
                gbps = moved / (t[1] * 1e-3) / 1e9 if mode == "fwd" else None
                rows.write({**common, "provider": provider, "mode": mode, "status": "ok", "p20_ms": t[0],
                            "p50_ms": t[1], "p80_ms": t[2], "calls_per_sample": 1 if slow else calls,
                            "bytes_moved": moved, "gb_per_s": gbps, "fraction_of_copy": fraction(gbps, copy_gbps),
                            "fraction_of_spec": fraction(gbps, spec_gbps)})
                print(f"{str(dtype)[6:]:9} crops={crops} {mode:7} {provider:12} p50 {t[1]:9.3f} ms  (p20 {t[0]:.3f}, "
                      f"p80 {t[2]:.3f})" + (f"  {gbps:7.1f} GB/s" if gbps else ""), flush=True)
            entry = {k + "_ms": round(v, 4) for k, v in times.items()}
            if "extension" in times:
                for other in ("grid_sample", "loop", "roi_align"):
                    if other in times:
                        entry[f"speedup_vs_{other}"] = round(times[other] / times["extension"], 2)
                if "grid_sample+bwd" in times and "extension+bwd" in times:
                    entry["speedup_fwd_bwd_vs_grid_sample"] = round(times["grid_sample+bwd"]
                                                                    / times["extension+bwd"], 2)
                gbps = moved / (times["extension"] * 1e-3) / 1e9
                entry["extension_gb_per_s"] = round(gbps, 1)
                entry["fraction_of_copy"] = fraction(gbps, copy_gbps)
            headline[f"{str(dtype)[6:]}_crops{crops}"] = entry

    summary = {"op": "crop_resize", "device": name, "extension_built": has_ext, "rows": str(rows.path),
               "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" and not cuda, "configs": headline}
    # Headline figures: the worst case over the measured configurations (crops per scene, dtypes).
    for key in ("speedup_vs_grid_sample", "speedup_vs_loop", "speedup_vs_roi_align", "fraction_of_copy"):
        values = [e[key] for e in headline.values() if e.get(key) is not None]
        if values:
            summary[key] = min(values)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
