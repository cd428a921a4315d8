"""Data loading: samples/s of the BigEarthNet v1 GeoTIFF reader (14 .tif per sample) vs the same data packed
(`mmfuse data pack`: LMDB + safetensors, read by BigEarthNetV2), reading in the main process (0) and with 1 and 2
worker processes, through the loader the engine uses (`SharedBatchLoader`) and through a stock DataLoader.

    python benchmarks/bench_data.py [--patches 48] [--epochs 2] [--batch-size 16] [--workers 0 1 2]

Then the packed paths per core: samples per CPU-second of the reading process (in-process, one thread; a figure a
busy machine changes far less than wall time) and per wall second, for the BigEarthNet v2 layout (`BigEarthNetV2`,
host normalization), a grid pack (`mmfuse data pack --grid`: `PackedDataset`, host normalization) and the grid
pack's raw values (`PackedDataset.raw_values()`, float32 and bfloat16, written straight into the loader's batch
buffer; the step normalizes on the device with `mmfuse_fast.engine.data.DeviceNormalize`).

Last line: JSON with packed_vs_geotiff (packed / GeoTIFF samples/s, one worker, the engine's loader), the ratio per
worker count and loader, the rates, and the per-core figures of the packed paths (`per_core_*`). A stock DataLoader
worker collates each batch into a fresh shared-memory segment; once reading costs well under 1 ms per sample, as the
packed reader's does, that transfer dominates. The engine's loader reuses its shared-memory batch slots (see
mmfuse_fast/data/loader.py)."""

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

from mmfuse_fast.data import BigEarthNetV1, BigEarthNetV2, PackedDataset, pack_dataset  # noqa: E402
from mmfuse_fast.data.loader import SharedBatchLoader  # noqa: E402
from mmfuse_fast.data.synthetic import write_bigearthnet_v1  # noqa: E402


LOADERS = {"engine": SharedBatchLoader, "stock": DataLoader}


def rates(dataset, loader_kind: str, workers: int, batch_size: int, epochs: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU-second of this process: meaningful in-process only)."""
    loader = LOADERS[loader_kind](dataset, batch_size, shuffle=True, num_workers=workers,
                                  persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up epoch: worker start, page cache
        pass
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += batch["s2"].shape[0]
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def rate(dataset, loader_kind: str, workers: int, batch_size: int, epochs: int) -> float:
    return rates(dataset, loader_kind, workers, batch_size, epochs)[0]


def packed_paths(root: Path, tmp: Path) -> dict:
    """The packed readers of the per-core comparison, by name."""
    pack_dataset("bigearthnet_v1", root, tmp / "grid", grid=True, progress=False)
    pack_dataset("bigearthnet_v1", root, tmp / "grid_bf16", grid=True, dtype="bfloat16", progress=False)
    grid = PackedDataset(tmp / "grid", split="all")
    return {"v2_layout_host_normalized": BigEarthNetV2(tmp / "packed", split=None),
            "grid_host_normalized": grid, "grid_raw_float32": grid.raw_values(),
            "grid_raw_bfloat16": PackedDataset(tmp / "grid_bf16", split="all").raw_values()}


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
        measured, rows = {}, []
        for kind in LOADERS:
            for workers in args.workers:
                for name, ds in readers.items():
                    r = rate(ds, kind, workers, args.batch_size, args.epochs)
                    measured[f"{name}_{kind}_w{workers}"] = round(r, 1)
                    print(f"{name:8s} {kind:6s} loader, workers={workers}: {r:8.1f} samples/s")
                    rows.append(row(args, name, kind, workers, r))
        per_core = {}
        for name, ds in packed_paths(root, Path(tmp)).items():
            wall, cpu = rates(ds, "engine", 0, args.batch_size, args.epochs)
            per_core[f"per_core_{name}"] = round(cpu, 1)
            per_core[f"wall_{name}"] = round(wall, 1)
            print(f"{name:26s} in-process: {cpu:8.1f} samples per CPU-second, {wall:8.1f} per wall second")
            rows.append(row(args, name, "engine", 0, cpu))
    append_rows("data", rows)
    w = 1 if 1 in args.workers else args.workers[0]  # headline: one worker process
    ratios = {f"packed_vs_geotiff_{kind}_w{k}": round(measured[f"packed_{kind}_w{k}"] /
                                                      measured[f"geotiff_{kind}_w{k}"], 2)
              for kind in LOADERS for k in args.workers}
    result = {"packed_vs_geotiff": ratios[f"packed_vs_geotiff_engine_w{w}"], "headline_workers": w,
              "headline_loader": "engine", **ratios, **{f"{k}_samples_per_s": v for k, v in measured.items()},
              **per_core,
              "pack_s": round(pack_s, 2), "pack_samples": report["samples"], "patches": args.patches,
              "batch_size": args.batch_size}
    print(json.dumps(result))


def row(args, reader: str, loader_kind: str, workers: int, samples_per_s: float) -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "op": "bigearthnet_read", "backend": reader,
            "shape": f"n={args.patches} bs={args.batch_size} workers={workers} loader={loader_kind}",
            "dtype": "float32", "device": device_name(torch.device("cpu")), "p20_ms": None,
            "p50_ms": round(1e3 / samples_per_s, 4), "p80_ms": None, "peak_mib": None, "torch": torch.__version__,
            "samples_per_s": round(samples_per_s, 2)}


if __name__ == "__main__":
    main()
