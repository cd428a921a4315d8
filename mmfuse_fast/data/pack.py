"""`mmfuse data pack`: GeoTIFF datasets -> one LMDB of safetensors blobs + `metadata.parquet` (the BigEarthNet v2
layout), so training reads one memory-mapped file instead of a dozen GeoTIFFs per sample.

Output layout::

    OUT/<Name>-LMDB/data.mdb   key -> safetensors blob
    OUT/metadata.parquet       one row per sample (ids, split, labels, LMDB keys, sha256 of every blob)
    OUT/manifest.json          what was packed (format, resolved root, reader options, layout, split lists),
                               modalities and band names, statistics, task, classes, counts

Two layouts:

- `bigearthnet_v2` (the default for `bigearthnet_v1`): exactly the BigEarthNet v2 (reBEN) layout: S2 blobs under the
  S2 patch name, S1 blobs under the S1 patch name, bands at native resolution in their stored dtype, `labels`
  (19-class names), `split`, `s1_name` and the snow/cloud flags in the parquet. `BigEarthNetV2(OUT, split=...)`
  (and `PackedDataset(OUT)`) reads it and returns exactly what `BigEarthNetV1` returns.
- `grid` (always for `sen12ms` / `seg_tiles`; `grid=True` for `bigearthnet_v1`): per sample id one blob
  {modality: (C, H, W) raw values on the model grid (resampled; NaN at nodata) in its `dtype`, "label"}.
  `PackedDataset(OUT)` reads it and returns exactly what the source reader returns (for `dtype` float32); a sample
  is one copy out of the memory map, and `raw_values()` hands the stored values to a device-side normalization.

A source without split lists gets a default split, drawn from a hash of each sample id (80 % train, 10 %
validation, 10 % test; the manifest says so under `split_lists`); split "all" selects every sample of any pack.

Safety: the source is never written, and a finished pack is replaced only by a verified one.
- `OUT` may not be the source, lie inside it or above it (compared resolved, symlinks followed).
- One packer per output: `OUT.lock` is held (flock) for the whole pack; a second one gets a `PackError`.
- Everything is written to `OUT.partial/` first, beside `OUT`. `OUT.partial/packing.json` records what is being
  packed; a pack resumes there only for the same format, root, options, layout, samples and split lists (else a
  `UsageError` naming the field). Each committed chunk of samples is logged with its blob checksums in
  `OUT.partial/progress.jsonl`; a resumed pack re-reads and re-hashes the logged blobs and skips those that verify.
  At the end every blob is re-read and checked against its sha256 and the key count against the sample count; only
  then are the parquet and manifest written and `OUT.partial` swapped in for `OUT` (the old pack is moved to
  `OUT.replaced` and deleted after the swap; a swap cut short is undone on the next run).
- An existing pack answers "already packed" only for the same format, root, options and layout; a folder that is
  not a pack is never replaced. Ctrl-C commits the samples read completely so far, then raises `Interrupted`;
  running the same pack again resumes.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmfuse_fast.errors import ConfigError, DataError, Interrupted, PackError, UsageError
from mmfuse_fast.file_lock import FileLock, LockHeld

from .bands import BAND_STATS, MODALITY_BANDS
from .base import resolve_stats
from .bigearthnet import BIGEARTHNET_CLASSES, METADATA_FILE, labels_to_multi_hot
from .blob_store import BlobStore, shared_lmdb_env
from .geotiff import RasterDataset
from .splits import resolve_splits, selects_all

FORMATS = ("bigearthnet_v1", "sen12ms", "seg_tiles")
LAYOUTS = ("bigearthnet_v2", "grid")
STORE_DTYPES = ("float32", "bfloat16", "uint16", "int16")
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"
PACKING = "packing.json"
PACK_VERSION = 2
DEFAULT_SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}  # the rest is train
# what must match for an existing pack to answer "already packed" (the rest needs the source read)
REQUEST_FIELDS = ("format", "root", "options", "layout", "dtype")


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _source_dataset(fmt: str, root, options: Mapping | None, layout: str):
    options = dict(options or {})
    if fmt == "bigearthnet_v1":
        from .bigearthnet import BigEarthNetV1 as reader

        fixed = {"split": None, "normalize": False}  # bands stored as read; statistics go to the manifest
    elif fmt == "sen12ms":
        from .sen12ms import SEN12MS as reader

        fixed = {"split": None}  # normalize=True: statistics computed, stored in the manifest
    elif fmt == "seg_tiles":
        from .seg_tiles import SegmentationTiles as reader

        fixed = {"split": None}
    else:
        raise ConfigError(f"unknown pack format {fmt!r}; known: {', '.join(FORMATS)}")
    if layout == "bigearthnet_v2" and fmt != "bigearthnet_v1":
        raise ConfigError(f"layout bigearthnet_v2 is for format bigearthnet_v1 only; {fmt} packs on its grid")
    accepted = [name for name in inspect.signature(reader).parameters if name != "root" and name not in fixed]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown reader option {unknown[0]!r} for format {fmt} (its options: {', '.join(accepted)})")
    return reader(root, **fixed, **options)


# -- blobs -----------------------------------------------------------------------------------------------------------

def _store(array: np.ndarray, dtype: str, where: str) -> torch.Tensor:
    """`array` (float32 raw values) in the pack's storage dtype; integer dtypes only hold values they represent
    exactly."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if dtype == "float32":
        return tensor
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16)
    values, limits = tensor.numpy(), np.iinfo(dtype)
    if not (np.isfinite(values).all() and np.array_equal(values, np.round(values))
            and limits.min <= values.min(initial=0) and values.max(initial=0) <= limits.max):
        raise DataError(f"{where}: values (NaN at nodata, fractions after resampling, or out of range) that "
                        f"{dtype} cannot hold; pack with dtype float32 or bfloat16")
    return torch.from_numpy(values.astype(np.dtype(dtype)))


def _ben_native_records(ds, index: int, dtypes: Mapping[str, str]) -> tuple[dict[str, bytes], dict] | None:
    """BigEarthNet v1 sample -> ({lmdb key: blob of {band: array}}, parquet row) in the v2 layout."""
    from safetensors.numpy import save as save_safetensors

    s2_name, s1_name = ds.ids[index], ds.s1_names[index]
    blobs = {}
    if "s2" in ds.modalities:
        blobs[s2_name] = save_safetensors(dict(ds.read_bands(index, "s2")))
    if "s1" in ds.modalities and s1_name is not None:
        blobs[s1_name] = save_safetensors(dict(ds.read_bands(index, "s1")))
    labels = [BIGEARTHNET_CLASSES[k] for k in np.flatnonzero(ds.labels[index])]
    return blobs, {"patch_id": s2_name, "s1_name": s1_name, "labels": labels}


def _ben_grid_records(ds, index: int, dtypes: Mapping[str, str]) -> tuple[dict[str, bytes], dict] | None:
    """BigEarthNet v1 sample -> one blob {modality: (C, 120, 120) as the reader returns it, "label": multi-hot}."""
    from safetensors.torch import save as save_tensors

    sample = ds[index]
    if sample["id"] != ds.ids[index]:
        return None  # on_error=skip replaced a bad sample: it is left out of the pack
    tensors = {m: _store(sample[m].numpy(), dtypes[m], f"sample {sample['id']} {m}") for m in ds.modalities}
    tensors["label"] = sample["label"]
    labels = [BIGEARTHNET_CLASSES[k] for k in np.flatnonzero(sample["label"].numpy())]
    return {sample["id"]: save_tensors(tensors)}, {"id": sample["id"], "labels": labels}


def _raster_records(ds: RasterDataset, index: int, dtypes: Mapping[str, str]
                    ) -> tuple[dict[str, bytes], dict] | None:
    from safetensors.torch import save as save_tensors

    raw = ds.read_raw(index)
    sample_id = ds.ids[index]
    tensors = {m: _store(raw[m], dtypes[m], f"sample {sample_id} {m}") for m in ds.modalities}
    label = np.asarray(raw["label"], dtype=np.int64)
    tensors["label"] = torch.from_numpy(np.ascontiguousarray(label.reshape(label.shape or (1,))))
    row = {"id": sample_id}
    if label.ndim == 0:
        row["label"] = int(label)
    return {sample_id: save_tensors(tensors)}, row


# -- what is packed, and where ---------------------------------------------------------------------------------------

def _canonical_options(options: Mapping | None) -> dict:
    return json.loads(json.dumps(dict(options or {}), sort_keys=True, default=str))


def pack_request(fmt: str, root, options: Mapping | None, layout: str, dtype: str | Mapping[str, str]) -> dict:
    """What a pack command asks for, as the manifest records it (compared before anything is read)."""
    return {"format": fmt, "root": str(Path(root).resolve()), "options": _canonical_options(options),
            "layout": layout, "dtype": dtype if isinstance(dtype, str) else dict(sorted(dtype.items()))}


def check_store_dtype(dtype: str | Mapping[str, str], layout: str) -> None:
    for value in [dtype] if isinstance(dtype, str) else dtype.values():
        if value not in STORE_DTYPES:
            raise ConfigError(f"unknown pack dtype {value!r}; known: {', '.join(STORE_DTYPES)}")
        if layout == "bigearthnet_v2" and value != "float32":
            raise ConfigError(f"dtype {value} needs the grid layout (grid=True / --grid): the BigEarthNet v2 layout "
                              f"stores every band as read")


def store_dtypes(dtype: str | Mapping[str, str], modalities: Sequence[str]) -> dict[str, str]:
    """{modality: storage dtype}: one for all, or per modality (float32 for those not named)."""
    if isinstance(dtype, str):
        return {m: dtype for m in modalities}
    unknown = sorted(set(dtype) - set(modalities))
    if unknown:
        raise ConfigError(f"pack dtype given for modality {unknown[0]!r}, which the data does not have "
                          f"({', '.join(modalities)})")
    return {m: dtype.get(m, "float32") for m in modalities}


def _digest(value) -> str:
    return _sha(json.dumps(value, sort_keys=True, default=str).encode())


def default_splits(ids: Sequence[str]) -> dict[str, str]:
    """A split for every id, the same for the same ids: ranked by a hash of the id, the first 10 % validation, the
    next 10 % test, the rest train (at least one sample each from three samples on)."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    n = len(ranked)
    counts = {name: max(1, round(fraction * n)) if n >= 3 else 0 for name, fraction in DEFAULT_SPLIT_FRACTIONS.items()}
    assigned, position = {}, 0
    for name, count in counts.items():
        for sample in ranked[position: position + count]:
            assigned[sample] = name
        position += count
    for sample in ranked[position:]:
        assigned[sample] = "train"
    return assigned


def _describe_difference(recorded: Mapping, wanted: Mapping, fields: Sequence[str]) -> str | None:
    for field in fields:
        if recorded.get(field) != wanted.get(field):
            return (f"field {field!r}: it holds {recorded.get(field, '(not recorded)')!r}, this command asks for "
                    f"{wanted.get(field)!r}")
    return None


def work_paths(out: Path) -> dict[str, Path]:
    """The folders and files a pack of `out` writes beside it."""
    return {"out": out, "partial": out.with_name(out.name + ".partial"),
            "replaced": out.with_name(out.name + ".replaced"), "lock": out.with_name(out.name + ".lock")}


def check_out_apart_from_root(root: Path, out: Path) -> None:
    """Refuses an output that is the source, inside it or above it (resolved paths: symlinks followed)."""
    source = root.resolve()
    for name, path in work_paths(out.resolve()).items():
        if name == "lock":
            continue
        written = f"--out {out}" if name == "out" else f"--out {out} (built beside it as {path})"
        if path == source:
            raise UsageError(f"{written} is the source --root {root} ({source}): packing there would replace the "
                             f"source; choose another --out")
        if path.is_relative_to(source):
            raise UsageError(f"{written} lies inside the source --root {root} ({source}); choose an --out outside "
                             f"it")
        if source.is_relative_to(path):
            raise UsageError(f"{written} contains the source --root {root} ({source}); choose an --out that does "
                             f"not hold the source")


@contextmanager
def pack_lock(lock_path: Path):
    """Holds an exclusive lock on `lock_path` (created if missing) while the pack runs; a second holder is refused."""
    try:
        with FileLock(lock_path):
            yield
    except LockHeld as held:
        raise PackError(f"another `mmfuse data pack` is writing this output ({lock_path} is held by "
                        f"{held.holder or 'another process'}); wait for it to finish") from None


def _finish_cut_swap(paths: dict[str, Path]) -> None:
    """Undoes a swap cut short: the old pack is put back if the new one never arrived, else dropped."""
    replaced, out = paths["replaced"], paths["out"]
    if not replaced.exists():
        return
    if (out / MANIFEST).is_file():
        shutil.rmtree(replaced)
    elif not out.exists():
        os.replace(replaced, out)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# -- packing ---------------------------------------------------------------------------------------------------------

def _open_writer(path: Path, map_size: int):
    import lmdb

    path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path), map_size=map_size, subdir=True, lock=True, readahead=False, meminit=False)


def _put_all(env, items: list[tuple[bytes, bytes]]):
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return env
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _read_progress(path: Path) -> dict[str, dict]:
    done = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption: that chunk is packed again
        done[record["sample"]] = record
    return done


def lmdb_name(layout: str) -> str:
    return "BigEarthNet-V2-LMDB" if layout == "bigearthnet_v2" else "data-LMDB"


def pack_dataset(fmt: str, root: str | os.PathLike, out: str | os.PathLike, options: Mapping | None = None,
                 chunk: int = 64, overwrite: bool = False, progress: bool = True,
                 stop_after: int | None = None, grid: bool = False,
                 dtype: str | Mapping[str, str] = "float32") -> dict:
    """Packs the dataset `fmt` at `root` into `out`; resumes an interrupted pack of the same data; returns a report.

    `options`: keyword arguments of the source reader (e.g. {"modalities": {"hsi": "images"},
    "reduce_zero_label": True} for seg_tiles). `grid`: a `bigearthnet_v1` pack stores the bands resampled to the
    120 px grid, one array per modality (read by `PackedDataset`); the other formats always do. `dtype`: how the
    grid layout stores the values, for every modality or {modality: dtype} (float32, the default: exact; bfloat16:
    half the bytes, rounded; uint16/int16: exact, for integer data only, a sample with other values is refused).
    `overwrite`: replace a finished pack (of anything) once the new one verifies; also discards an unfinished pack
    of other data. `stop_after`: stop (as if interrupted) after that many newly
    packed samples — for tests of resumption. Ctrl-C raises `Interrupted` (exit 130 in the CLI); every sample read
    completely by then is kept in `OUT.partial`, and the same call resumes there."""
    layout = "grid" if grid or fmt != "bigearthnet_v1" else "bigearthnet_v2"
    check_store_dtype(dtype, layout)
    root, out = Path(root), Path(out)
    check_out_apart_from_root(root, out)
    paths = work_paths(out.resolve())
    paths["out"].parent.mkdir(parents=True, exist_ok=True)
    request = pack_request(fmt, root, options, layout, dtype)
    with pack_lock(paths["lock"]):
        try:
            return _pack(request, paths, options, chunk, overwrite, progress, stop_after)
        except KeyboardInterrupt:
            kept = len(_read_progress(paths["partial"] / PROGRESS))
            raise Interrupted(f"pack interrupted; {kept} packed samples are kept in {paths['partial']}: run the "
                              f"same command again to resume (it verifies them and packs the rest)") from None


def _pack(request: dict, paths: dict[str, Path], options, chunk, overwrite, progress, stop_after) -> dict:
    from tqdm.auto import tqdm

    out, partial = paths["out"], paths["partial"]
    fmt, layout = request["format"], request["layout"]
    _finish_cut_swap(paths)
    if (out / MANIFEST).is_file() and not overwrite:
        recorded = json.loads((out / MANIFEST).read_text()).get("packed", {})
        difference = _describe_difference(recorded, request, REQUEST_FIELDS)
        if difference:
            raise UsageError(f"{out} is already a pack of other data ({difference}); pass --overwrite to replace "
                             f"it once the new pack verifies, or choose another --out")
        return {**verify_pack(out), "status": "already packed"}
    if out.exists() and not (out / MANIFEST).is_file() and not _is_empty_dir(out):
        raise PackError(f"{out} exists and is not a finished pack (no {MANIFEST}); it is never replaced: remove it "
                        f"yourself or choose another --out")
    t0 = time.perf_counter()
    ds = _source_dataset(fmt, request["root"], options, layout)  # a mistyped root fails here, before any write
    split_of = {sample: ds.split_of.get(sample) for sample in ds.ids}
    split_lists = "source"
    if split_of and all(name is None for name in split_of.values()):
        split_of, split_lists = default_splits(ds.ids), "default: 80% train, 10% validation, 10% test by id hash"
    dtypes = store_dtypes(request["dtype"], ds.modalities)
    packing = {**request, "samples": _digest(list(ds.ids)), "splits": _digest(split_of), "split_lists": split_lists}
    _claim_partial(partial, packing, overwrite)
    records = {"bigearthnet_v2": _ben_native_records, "grid": _ben_grid_records}[layout] \
        if fmt == "bigearthnet_v1" else _raster_records
    db_path = partial / lmdb_name(layout)
    env = _open_writer(db_path, 1 << 30)
    progress_path = partial / PROGRESS
    done = _read_progress(progress_path)
    verified_resume = 0
    with env.begin() as txn:  # a resumed pack trusts a logged sample only if its blobs still hash right
        for sample, record in list(done.items()):
            if any((blob := txn.get(k.encode())) is None or _sha(blob) != h for k, h in record["sha256"].items()):
                del done[sample]
            else:
                verified_resume += 1
    rows, new = [], 0
    pending_items, pending_records = [], []

    def flush():
        nonlocal env
        if not pending_items:
            return
        env = _put_all(env, pending_items)
        env.sync()
        with open(progress_path, "a") as handle:
            for record in pending_records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        pending_items.clear()
        pending_records.clear()

    try:
        for index in tqdm(range(len(ds)), desc=f"pack {fmt}", disable=not progress, dynamic_ncols=True):
            sample = ds.ids[index]
            if sample in done:
                rows.append(done[sample]["row"])
                continue
            if stop_after is not None and new >= stop_after:
                flush()
                return {"status": "interrupted", "packed": len(done) + new, "total": len(ds)}
            packed = records(ds, index, dtypes)
            if packed is None:
                continue
            encoded, row = packed
            row["split"] = split_of[sample]
            sha = {key: _sha(blob) for key, blob in encoded.items()}
            row["sha256"] = json.dumps(sha)
            pending_items.extend((key.encode(), blob) for key, blob in encoded.items())
            pending_records.append({"sample": sample, "sha256": sha, "row": row})
            rows.append(row)
            new += 1
            if len(pending_records) >= chunk:
                flush()
        flush()
        expected = _verify_written(env, rows, db_path)
    except KeyboardInterrupt:
        flush()  # the samples read completely before Ctrl-C are kept too (a second Ctrl-C here loses only them)
        raise
    finally:
        env.close()
    table = pd.DataFrame(rows)
    if fmt == "bigearthnet_v1" and layout == "bigearthnet_v2":
        _add_snow_cloud_flags(table, Path(request["root"]))
    table.to_parquet(partial / METADATA_FILE, index=False)
    manifest = {"pack_version": PACK_VERSION, "format": fmt, "source": request["root"], "packed": packing,
                "layout": layout, "dtypes": dtypes, "lmdb": lmdb_name(layout), "samples": len(rows),
                "keys": len(expected), "modalities": list(ds.modalities),
                "bands": {m: list(ds.bands[m]) for m in ds.modalities},
                "split_counts": {str(k): int(v) for k, v in table["split"].value_counts(dropna=False).items()},
                "metadata_sha256": _sha((partial / METADATA_FILE).read_bytes())}
    manifest.update(_task_fields(ds, options))
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _swap_in(paths)
    return {"status": "packed", "out": str(out), "samples": len(rows), "keys": len(expected), "new": new,
            "resumed_verified": verified_resume, "layout": layout, "dtypes": dtypes, "split_lists": split_lists,
            "wall_s": round(time.perf_counter() - t0, 3)}


def _claim_partial(partial: Path, packing: dict, overwrite: bool) -> None:
    """Makes `partial` the work folder of this pack: resumed if it packs the same data, discarded (with overwrite)
    if it is an unfinished pack of other data, never touched if it is not a pack at all."""
    record_path = partial / PACKING
    if partial.exists() and not _is_empty_dir(partial):
        if not record_path.is_file() and not (partial / PROGRESS).is_file():
            raise PackError(f"{partial} exists and is not an unfinished pack; it is never replaced: remove it "
                            f"yourself or choose another --out")
        recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
        difference = _describe_difference(recorded, packing, (*REQUEST_FIELDS, "samples", "splits"))
        if difference and not overwrite:
            raise UsageError(f"{partial} is an unfinished pack of other data ({difference}); run the command that "
                             f"started it to resume, or pass --overwrite to discard it")
        if difference:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(packing, indent=1) + "\n")


def _verify_written(env, rows: list[dict], db_path: Path) -> dict[str, str]:
    """Every blob re-read and re-hashed, and the key count matched; returns {key: sha256}."""
    expected = {}
    for row in rows:
        expected.update(json.loads(row["sha256"]))
    with env.begin() as txn:
        n_keys = txn.stat()["entries"]
        for key, digest in expected.items():
            blob = txn.get(key.encode())
            if blob is None or _sha(blob) != digest:
                raise PackError(f"verification failed: LMDB key {key} in {db_path} is missing or its checksum "
                                f"differs; run the pack again (it resumes)")
    if n_keys != len(expected):
        raise PackError(f"verification failed: {db_path} holds {n_keys} keys, the {len(rows)} samples have "
                        f"{len(expected)}")
    return expected


def _task_fields(ds, options: Mapping | None) -> dict:
    if isinstance(ds, RasterDataset):
        return dict(task=ds.task, num_classes=ds.num_classes, classes=list(ds.classes), ignore_index=ds.ignore_index,
                    stats={m: {b: list(v) for b, v in ds.stats[m].items()} for m in ds.modalities})
    given = resolve_stats((options or {}).get("stats"), MODALITY_BANDS, ds.bands)
    stats = {m: {b: list({**BAND_STATS[m], **given.get(m, {})}[b]) for b in ds.bands[m]} for m in ds.modalities}
    return dict(task="multilabel", num_classes=len(BIGEARTHNET_CLASSES), classes=list(BIGEARTHNET_CLASSES),
                ignore_index=None, stats=stats)


def _swap_in(paths: dict[str, Path]) -> None:
    """`OUT.partial` (finished, verified) becomes `OUT`; an old pack is moved aside first and deleted last."""
    out, partial, replaced = paths["out"], paths["partial"], paths["replaced"]
    if out.exists():
        os.replace(out, replaced)
    os.replace(partial, out)
    for name in (PROGRESS, PACKING):  # after the rename: until then an interrupted pack still resumes from them
        (out / name).unlink()
    if replaced.exists():
        shutil.rmtree(replaced)


def _add_snow_cloud_flags(table: pd.DataFrame, root: Path) -> None:
    from .splits import find_list_file, read_split_rows

    for column, file_name in (("contains_seasonal_snow", "patches_with_seasonal_snow.csv"),
                              ("contains_cloud_or_shadow", "patches_with_cloud_and_shadow.csv")):
        path = find_list_file(root, file_name)  # as shipped: also .csv.bz2
        listed = {row[0] for row in read_split_rows(path)} if path is not None else set()
        table[column] = table["patch_id"].isin(listed)


def read_manifest(out: str | os.PathLike) -> dict:
    """The manifest of the finished pack `out`; FileNotFoundError naming it when `out` is not one."""
    manifest_path = Path(out) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"not a finished pack: {manifest_path} missing (an interrupted pack is "
                                f"{Path(out).name}.partial; run `mmfuse data pack` again to finish it)")
    manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("layout", "bigearthnet_v2" if manifest.get("format") == "bigearthnet_v1" else "grid")
    return manifest


def verify_pack(out: str | os.PathLike) -> dict:
    """Re-reads every blob of a finished pack and checks counts and checksums; raises PackError on a mismatch."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise PackError(f"{out} is not a finished pack: {MANIFEST} missing")
    manifest = read_manifest(out)
    if _sha((out / METADATA_FILE).read_bytes()) != manifest["metadata_sha256"]:
        raise PackError(f"{out / METADATA_FILE}: checksum differs from the manifest")
    table = pd.read_parquet(out / METADATA_FILE)
    if len(table) != manifest["samples"]:
        raise PackError(f"{out / METADATA_FILE}: {len(table)} rows, the manifest says {manifest['samples']}")
    env = shared_lmdb_env(out / manifest["lmdb"])
    n = 0
    with env.begin(buffers=True) as txn:
        if txn.stat()["entries"] != manifest["keys"]:
            raise PackError(f"{out / manifest['lmdb']}: {txn.stat()['entries']} keys, manifest says "
                            f"{manifest['keys']}")
        for cell in table["sha256"]:
            for key, digest in json.loads(cell).items():
                blob = txn.get(key.encode())
                if blob is None or _sha(bytes(blob)) != digest:
                    raise PackError(f"{out / manifest['lmdb']}: key {key} missing or corrupt (checksum differs)")
                n += 1
    return {"status": "verified", "out": str(out), "samples": len(table), "keys": n}


# -- reading ---------------------------------------------------------------------------------------------------------

def no_sample_selected_error(table: pd.DataFrame, split, root: Path) -> DataError:
    """The error for a named split that selects no sample of the pack at `root` (metadata `table`)."""
    if table["split"].notna().any():
        counts = ", ".join(f"{name} {count}" for name, count in table["split"].value_counts().items())
        return DataError(f"split {split!r} selects no sample of the pack {root} (its splits: {counts}); use one of "
                         f"them or 'all'")
    return DataError(f"split {split!r} selects no sample of the pack {root}: its source had no split lists and it "
                     f"was packed before packs got a default split; use split 'all' (data.splits=[all]) or pack "
                     f"it again")


class PackedDataset(RasterDataset):
    """Reads a pack: the same samples as the source reader, from one LMDB.

    `split`: a split name, a list of them, or "all" / None for every sample. `bands` selects/reorders by name
    among the packed bands; statistics are the pack's unless `stats` overrides them. `raw_values()` gives a reader
    of the stored values, for a normalization on the device.

    A pack in the BigEarthNet v2 layout (`bigearthnet_v1` packed without `grid`) is read by `BigEarthNetV2`:
    `PackedDataset(root, ...)` returns that reader."""

    def __new__(cls, root: str | os.PathLike | None = None, *args, **kwargs):
        # (root None: unpickling, which makes the instance first and restores its state after)
        if cls is PackedDataset and root is not None and read_manifest(root)["layout"] == "bigearthnet_v2":
            return _open_bigearthnet_v2_pack(Path(root), *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str] | None = None,
                 modalities: Sequence[str] | None = None, normalize: bool = True,
                 bands: Mapping[str, Sequence[str]] | None = None,
                 stats: Mapping[str, Mapping[str, tuple[float, float]]] | None = None, on_error: str = "raise"):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.task = self.manifest["task"]
        self.num_classes, self.classes = self.manifest["num_classes"], tuple(self.manifest["classes"])
        self.ignore_index = self.manifest["ignore_index"]
        self.available_bands = {m: tuple(b) for m, b in self.manifest["bands"].items()}
        table = pd.read_parquet(self.root / METADATA_FILE)
        if not selects_all(split):
            table = table[table["split"].isin(resolve_splits(split, self.root))]
            if not len(table):
                raise no_sample_selected_error(pd.read_parquet(self.root / METADATA_FILE), split, self.root)
        self.ids = list(table["id"])
        self.split_of = dict(zip(table["id"], table["split"]))
        # every sample's class(es) from the metadata, so label subsets are drawn without reading samples
        self.labels = None
        if self.task == "scene" and "label" in table.columns:
            self.labels = np.asarray(table["label"], dtype=np.int64)
        elif self.task == "multilabel" and "labels" in table.columns:
            self.labels = np.stack([labels_to_multi_hot(list(names), sample) for names, sample
                                    in zip(table["labels"], table["id"])]) if len(table) else None
        merged = {m: {b: tuple(v) for b, v in s.items()} for m, s in self.manifest["stats"].items()}
        for m, given in (stats or {}).items():  # a CSV path replaces the pack's statistics of its modality
            merged[m] = given if isinstance(given, (str, os.PathLike)) else {**merged.get(m, {}), **given}
        self._setup(modalities or list(self.available_bands), bands, normalize, merged, on_error)
        self.raw = False
        self.lmdb_path = self.root / self.manifest["lmdb"]
        self.store = BlobStore(self.lmdb_path)
        select = {m: [self.available_bands[m].index(b) for b in self.bands[m]] for m in self.modalities}
        self._blob_select = {m: None if channels == list(range(len(self.available_bands[m]))) else channels
                             for m, channels in select.items()}
        self._blob_select["label"] = None

    def raw_values(self) -> PackedDataset:
        """This reader, returning each modality as stored: the pack's dtype (integers, bf16 or float32), NaN at
        nodata kept, not normalized, one copy out of the memory map. `mmfuse_fast.engine.data.DeviceNormalize.
        for_dataset(self)` then gives on the device exactly the numbers this reader gives."""
        if not self.normalize:
            raise ConfigError(f"raw values of the pack {self.root} are for a normalization on the device; this "
                              f"reader normalizes nothing (normalize=False): its samples are raw already")
        self.normalization_stats()  # computed here, once, not in every worker
        raw = copy.copy(self)
        raw.raw = True
        return raw

    def read_sample_into(self, index: int, out: Mapping[str, torch.Tensor]) -> dict | None:
        """Raw values only: writes sample `index` into `out` ({modality and "label": a tensor of its shape and
        dtype}, e.g. a row of the loader's batch buffer: one copy from the memory map, no allocation) and returns
        its other fields ({"id": ...}); None, with nothing promised about `out`, when the sample does not fit
        `out` (the caller then reads it with `self[index]`), when this reader normalizes on the host, or when it
        skips bad samples (their replacement is `self[index]`'s business)."""
        if not self.raw or self.on_error != "raise" or set(out) != {*self.modalities, "label"}:
            return None
        with self.store.views(self.ids[index], f"sample {self.ids[index]}") as views:
            for name, target in out.items():
                view, bf16 = views.get(name, (None, False))
                if view is None or bf16 != (target.dtype == torch.bfloat16):
                    return None
                channels = self._blob_select[name]
                shape = view.shape if channels is None else (len(channels), *view.shape[1:])
                if name == "label" and self.task == "scene":
                    shape = ()
                destination = (target.view(torch.uint16) if bf16 else target).numpy()
                if tuple(shape) != tuple(target.shape) or destination.dtype != view.dtype:
                    return None
                if channels is None:
                    np.copyto(destination, view.reshape(destination.shape))
                else:
                    np.take(view, channels, axis=0, out=destination)
        return {"id": self.ids[index]}

    def read_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """{modality: stored values of the selected bands (C, H, W), "label": as stored} of sample `index`."""
        return self.store.arrays(self.ids[index], f"sample {self.ids[index]}", select=self._blob_select)

    def _label(self, label: torch.Tensor) -> torch.Tensor:
        if self.task == "scene":
            return label.reshape(())
        return label

    def read_raw(self, index: int) -> dict:
        tensors = self.read_tensors(index)
        out = {m: tensors[m].float().numpy() for m in self.modalities}
        out["label"] = self._label(tensors["label"]).numpy()
        return out

    def _load_sample(self, index: int) -> dict:
        if not self.raw:
            sample = self.finish(self.read_raw(index), self.ids[index])
            if self.task == "multilabel":  # multi-hot floats, as the BigEarthNet readers give them
                sample["label"] = sample["label"].float()
            return sample
        tensors = self.read_tensors(index)
        sample = {m: tensors[m] for m in self.modalities}
        sample["label"] = self._label(tensors["label"])
        sample["id"] = self.ids[index]
        return sample


def _open_bigearthnet_v2_pack(root: Path, split=None, modalities=None, normalize=True, bands=None, stats=None,
                              on_error="raise"):
    from .bigearthnet import BigEarthNetV2

    if not selects_all(split):
        table = pd.read_parquet(root / METADATA_FILE, columns=["split"])
        if not table["split"].isin(resolve_splits(split, root)).any():
            raise no_sample_selected_error(table, split, root)
    return BigEarthNetV2(root, split=split, modalities=modalities or ("s1", "s2"), normalize=normalize, bands=bands,
                         on_error=on_error, stats=stats)
