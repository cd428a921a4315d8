"""Benchmark of `crop_resize`: the C++/CUDA extension against the ways stock PyTorch does the same thing.

    python benchmarks/bench_crop_resize.py                  # quick CPU run (N=256, C=14, 120x120 -> 120x120)
    python benchmarks/bench_crop_resize.py --device cuda    # on a GPU (default when CUDA is available)

The cross-scale branch crops every scene (all bands) at random boxes and resizes the crops back to the input size;
1 and 2 crops per scene are measured (K = N and 2N boxes, box_index = arange(N) repeated). Backends:
  extension    torch.ops.mmfuse.crop_resize (csrc/), the package's default when built
  grid_sample  the pure-PyTorch fallback (ops/reference.py): gather the images, one grid_sample
  loop         per box F.interpolate of the integer-rounded crop (what a per-sample RandomResizedCrop does;
               it needs the boxes on the host, so this timing includes that copy)
  roi_align    torchvision.ops.roi_align(aligned=True, sampling_ratio=1), when torchvision is installed
On a GPU the extension's bandwidth counts the bytes it must move: each box's source window (the pixels its samples
touch) read once plus the output written, against the device's peak.

On this project's CPU VMs a page fault costs several microseconds, so the time of every backend is dominated by
first-touching its freshly allocated output; the script therefore enables torch's transparent-huge-page allocation
(THP_MEM_ALLOC_ENABLE=1, the same for all backends) unless --no-thp is given. Rows go to
benchmarks/results/crop_resize.csv; the last printed line is a JSON object with the headline figures.
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
from _util import append_rows, device_name, measure, result_row  # noqa: E402

from mmfuse_fast.ops import _extension, crop_resize, random_boxes  # noqa: E402
from mmfuse_fast.ops.reference import crop_resize_reference  # noqa: E402

# Peak DRAM bandwidth, GB/s (vendor figures).
PEAK_BANDWIDTH = {"H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "GH200": 4000,
                  "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "A10": 600, "L4": 300}


def peak_bandwidth(name: str) -> float | None:
    for key in sorted(PEAK_BANDWIDTH, key=len, reverse=True):
        if key in name:
            return PEAK_BANDWIDTH[key]
    return None


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
        rois = torch.cat([box_index[:, None].to(boxes.dtype), boxes], 1)
        return roi_align(images, rois, size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=256, help="scenes")
    parser.add_argument("--channels", type=int, default=14, help="all bands of all modalities")
    parser.add_argument("--size", type=int, default=120, help="input and output side")
    parser.add_argument("--crops", type=int, nargs="+", default=[1, 2], help="crops per scene")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16/float16 (GPU default: "
                                                      "float32 and bfloat16)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 CPU, 50 GPU)")
    parser.add_argument("--loop-reps", type=int, default=2, help="repetitions of the slow per-box loop")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward (images need grad)")
    parser.add_argument("--no-thp", action="store_true", help="leave torch's CPU allocator at 4 KiB pages")
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    reps = args.reps or (50 if cuda else 5)
    warmup = 5 if cuda else 1
    dtypes = [getattr(torch, args.dtype)] if args.dtype else ([torch.float32, torch.bfloat16] if cuda else
                                                               [torch.float32])
    size = (args.size, args.size)
    name = device_name(device)
    has_ext = _extension.has_kernel("crop_resize", device.type)
    roi = make_roi_align(size)
    rows, headline = [], {}
    torch.manual_seed(0)
    for dtype in dtypes:
        images = torch.randn(args.n, args.channels, args.size, args.size, device=device).to(dtype)
        for crops in args.crops:
            boxes = random_boxes(args.n * crops, args.size, args.size, device=device)
            box_index = torch.arange(args.n, device=device).repeat(crops)
            shape = f"N={args.n} C={args.channels} {args.size}x{args.size}->{size[0]}x{size[1]} K={len(boxes)}"
            backends = {}
            if has_ext:
                backends["extension"] = lambda: crop_resize(images, boxes, size, box_index, backend="extension")
            backends["grid_sample"] = lambda: crop_resize_reference(images, boxes, size, box_index)
            backends["loop"] = lambda: make_loop(size)(images, boxes, box_index)
            if roi is not None:
                backends["roi_align"] = lambda: roi(images, boxes, box_index)
            times = {}
            for backend, fn in backends.items():
                n_reps = min(reps, args.loop_reps) if backend == "loop" else reps
                t, peak = measure(fn, device, warmup=1 if backend == "loop" else warmup, reps=n_reps)
                times[backend] = t[1]
                gbps = bytes_moved(images, boxes, box_index, size) / (t[1] * 1e-3) / 1e9
                rows.append(result_row("crop_resize", backend, shape, dtype, device, t, peak, **{"pass": "fwd"},
                                       gb_per_s=round(gbps, 1)))
                print(f"{str(dtype)[6:]:9} crops={crops} fwd     {backend:12} p50 {t[1]:9.3f} ms  "
                      f"(p20 {t[0]:.3f}, p80 {t[2]:.3f})  {gbps:7.1f} GB/s  peak {peak if peak is None else round(peak, 1)} MiB",
                      flush=True)
            if args.backward:
                grad = torch.randn(len(boxes), args.channels, *size, device=device).to(dtype)
                x = images.detach().requires_grad_(True)
                for backend in [b for b in ("extension", "grid_sample") if b in backends]:
                    be = "extension" if backend == "extension" else "reference"

                    def step(be=be):
                        x.grad = None
                        crop_resize(x, boxes, size, box_index, backend=be).backward(grad)
                    t, peak = measure(step, device, warmup=warmup, reps=reps)
                    times[backend + "_fwd_bwd"] = t[1]
                    rows.append(result_row("crop_resize", backend, shape, dtype, device, t, peak, **{"pass": "fwd_bwd"},
                                           gb_per_s=None))
                    print(f"{str(dtype)[6:]:9} crops={crops} fwd+bwd {backend:12} p50 {t[1]:9.3f} ms", flush=True)
            entry = {k + "_ms": round(v, 3) for k, v in times.items()}
            if "extension" in times:
                for other in ("grid_sample", "loop", "roi_align"):
                    if other in times:
                        entry[f"speedup_vs_{other}"] = round(times[other] / times["extension"], 2)
                if "grid_sample_fwd_bwd" in times:
                    entry["speedup_fwd_bwd_vs_grid_sample"] = round(times["grid_sample_fwd_bwd"]
                                                                    / times["extension_fwd_bwd"], 2)
                if cuda:
                    gbps = bytes_moved(images, boxes, box_index, size) / (times["extension"] * 1e-3) / 1e9
                    entry["extension_gb_per_s"] = round(gbps, 1)
                    peak_bw = peak_bandwidth(name)
                    if peak_bw:
                        entry["fraction_of_peak_bandwidth"] = round(gbps / peak_bw, 3)
            headline[f"{str(dtype)[6:]}_crops{crops}"] = entry

    if not args.no_save:
        append_rows("crop_resize", rows)
    summary = {"op": "crop_resize", "device": name, "extension_built": has_ext,
               "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" and not cuda, "configs": headline}
    # Headline figures: the worst case over the measured configurations (crops per scene, dtypes).
    for key in ("speedup_vs_grid_sample", "speedup_vs_loop", "speedup_vs_roi_align", "fraction_of_peak_bandwidth"):
        values = [e[key] for e in headline.values() if key in e]
        if values:
            summary[key] = min(values)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
