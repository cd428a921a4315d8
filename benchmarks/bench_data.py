"""Data loading: samples/s of the BigEarthNet v1 GeoTIFF reader (14 .tif per sample) vs the same data packed
(`mmfuse data pack`: LMDB + safetensors, read by BigEarthNetV2), reading in the main process (0) and with 1 and 2
DataLoader workers.

    python benchmarks/bench_data.py [--patches 48] [--epochs 2] [--batch-size 16] [--workers 0 1 2]

Last line: JSON with packed_vs_geotiff (packed / GeoTIFF samples/s with one DataLoader worker), the ratio per
worker count and the rates. With worker processes the packed reader's rate includes the batch transfer to the main
process, which dominates once reading costs ~1 ms per sample."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import append_rows, device_name  # noqa: E402

from mmfuse_fast.data import BigEarthNetV1, BigEarthNetV2, pack_dataset  # noqa: E402
from mmfuse_fast.data.synthetic import write_bigearthnet_v1  # noqa: E402


def rate(dataset, workers: int, batch_size: int, epochs: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up epoch: worker start, page cache
        pass
    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += batch["s2"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patches", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="DataLoader num_workers values (0 = read in the main process)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_bigearthnet_v1(Path(tmp) / "ben_v1", n=args.patches)
        t0 = time.perf_counter()
        report = pack_dataset("bigearthnet_v1", root, Path(tmp) / "packed", progress=False)
        pack_s = time.perf_counter() - t0
        readers = {"geotiff": BigEarthNetV1(root, split=None), "packed": BigEarthNetV2(Path(tmp) / "packed",
                                                                                        split=None)}
        rates, rows = {}, []
        for workers in args.workers:
            for name, ds in readers.items():
                r = rate(ds, workers, args.batch_size, args.epochs)
                rates[f"{name}_w{workers}"] = round(r, 1)
                print(f"{name:8s} workers={workers}: {r:8.1f} samples/s")
                ms = 1e3 / r
                rows.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "op": "bigearthnet_read", "backend": name,
                             "shape": f"n={args.patches} bs={args.batch_size} workers={workers}", "dtype": "float32",
                             "device": device_name(torch.device("cpu")), "p20_ms": None, "p50_ms": round(ms, 4),
                             "p80_ms": None, "peak_mib": None, "torch": torch.__version__,
                             "samples_per_s": round(r, 2)})
    append_rows("data", rows)
    w = 1 if 1 in args.workers else args.workers[0]  # headline: one DataLoader worker process
    result = {"packed_vs_geotiff": round(rates[f"packed_w{w}"] / rates[f"geotiff_w{w}"], 2), "headline_workers": w,
              **{f"packed_vs_geotiff_w{k}": round(rates[f"packed_w{k}"] / rates[f"geotiff_w{k}"], 2)
                 for k in args.workers},
              **{f"{k}_samples_per_s": v for k, v in rates.items()},
              "pack_s": round(pack_s, 2), "pack_samples": report["samples"], "patches": args.patches,
              "batch_size": args.batch_size}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
