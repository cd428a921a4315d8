"""`mmfuse data pack`: GeoTIFF datasets -> one LMDB of safetensors blobs + `metadata.parquet` (the BigEarthNet v2
layout), so training reads one memory-mapped file instead of a dozen GeoTIFFs per sample.

Output layout::

    OUT/<Name>-LMDB/data.mdb   key -> safetensors blob
    OUT/metadata.parquet       one row per sample (ids, split, labels, LMDB keys, sha256 of every blob)
    OUT/manifest.json          format, modalities and band names, statistics, task, classes, counts

- `bigearthnet_v1` packs to exactly the BigEarthNet v2 (reBEN) layout: S2 blobs under the S2 patch name, S1 blobs
  under the S1 patch name, bands at native resolution in their stored dtype, `labels` (19-class names), `split`,
  `s1_name` and the snow/cloud flags in the parquet. `BigEarthNetV2(OUT, split=...)` reads it and returns exactly
  what `BigEarthNetV1` returns.
- `sen12ms` / `seg_tiles` store, per sample id, {modality: float32 (C, H, W) raw values after resampling (NaN at
  nodata), "label": int64}; `PackedDataset(OUT)` reads it and returns exactly what the source reader returns.

Safety: everything is written to `OUT.partial/` first. Each committed chunk of samples is logged with its blob
checksums in `OUT.partial/progress.jsonl`; an interrupted pack resumes there, re-reading and re-hashing the logged
blobs and skipping those that verify. At the end every blob of every sample is re-read and checked against its
sha256 and the key count against the sample count; only then are the parquet and manifest written and
`OUT.partial` renamed to `OUT`. A dataset directory without `manifest.json` is never a finished pack. Ctrl-C
commits the samples read completely so far, then raises `Interrupted`; running the same pack again resumes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmfuse_fast.errors import ConfigError, DataError, Interrupted, PackError

from .bigearthnet import BIGEARTHNET_CLASSES, METADATA_FILE, resolve_splits, shared_lmdb_env
from .geotiff import DataFileError, RasterDataset

FORMATS = ("bigearthnet_v1", "sen12ms", "seg_tiles")
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"
PACK_VERSION = 1


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _source_dataset(fmt: str, root, options: Mapping | None):
    options = dict(options or {})
    if fmt == "bigearthnet_v1":
        from .bigearthnet import BigEarthNetV1 as reader

        fixed = {"split": None, "normalize": False}  # bands stored as read; the v2 layout has no statistics
    elif fmt == "sen12ms":
        from .sen12ms import SEN12MS as reader

        fixed = {"split": None}  # normalize=True: statistics computed, stored in the manifest
    elif fmt == "seg_tiles":
        from .seg_tiles import SegmentationTiles as reader

        fixed = {"split": None}
    else:
        raise ConfigError(f"unknown pack format {fmt!r}; known: {', '.join(FORMATS)}")
    accepted = [name for name in inspect.signature(reader).parameters if name != "root" and name not in fixed]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown reader option {unknown[0]!r} for format {fmt} (its options: {', '.join(accepted)})")
    return reader(root, **fixed, **options)


def _ben_records(ds, index: int) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """BigEarthNet v1 sample -> ({lmdb key: {band: array}}, parquet row)."""
    s2_name, s1_name = ds.ids[index], ds._s1_names[index]
    blobs = {}
    if "s2" in ds.modalities:
        blobs[s2_name] = dict(ds._read_bands(index, "s2"))
    if "s1" in ds.modalities and s1_name is not None:
        blobs[s1_name] = dict(ds._read_bands(index, "s1"))
    labels = [BIGEARTHNET_CLASSES[k] for k in np.flatnonzero(ds.labels[index])]
    row = {"patch_id": s2_name, "s1_name": s1_name, "labels": labels, "split": ds.split_of.get(s2_name)}
    return blobs, row


def _raster_records(ds: RasterDataset, index: int) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    raw = ds.read_raw(index)
    sample_id = ds.ids[index]
    tensors = {m: np.ascontiguousarray(raw[m], dtype=np.float32) for m in ds.modalities}
    label = np.asarray(raw["label"], dtype=np.int64)
    tensors["label"] = np.ascontiguousarray(label.reshape(label.shape or (1,)))
    row = {"id": sample_id, "split": ds.split_of.get(sample_id)}
    if label.ndim == 0:
        row["label"] = int(label)
    return {sample_id: tensors}, row


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


def lmdb_name(fmt: str) -> str:
    return "BigEarthNet-V2-LMDB" if fmt == "bigearthnet_v1" else "data-LMDB"


def pack_dataset(fmt: str, root: str | os.PathLike, out: str | os.PathLike, options: Mapping | None = None,
                 chunk: int = 64, overwrite: bool = False, progress: bool = True,
                 stop_after: int | None = None) -> dict:
    """Packs the dataset `fmt` at `root` into `out`; resumes an interrupted pack; returns a report.

    `options`: keyword arguments of the source reader (e.g. {"modalities": {"hsi": "images"},
    "reduce_zero_label": True} for seg_tiles). `stop_after`: stop (as if interrupted) after that many newly
    packed samples — for tests of resumption. Ctrl-C raises `Interrupted` (exit 130 in the CLI); every sample
    read completely by then is kept in `OUT.partial`, and the same call resumes there."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    try:
        return _pack(fmt, root, out, partial, options, chunk, overwrite, progress, stop_after)
    except KeyboardInterrupt:
        kept = len(_read_progress(partial / PROGRESS))
        raise Interrupted(f"pack interrupted; {kept} packed samples are kept in {partial}: run the same command "
                          f"again to resume (it verifies them and packs the rest)") from None


def _pack(fmt, root, out: Path, partial: Path, options, chunk, overwrite, progress, stop_after) -> dict:
    from safetensors.numpy import save as save_safetensors
    from tqdm.auto import tqdm

    if (out / MANIFEST).is_file() and not overwrite:
        report = verify_pack(out)
        return {**report, "status": "already packed"}
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise PackError(f"{out} exists and is not a finished pack (no {MANIFEST}); remove it or pass overwrite")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    ds = _source_dataset(fmt, root, options)
    records = _ben_records if fmt == "bigearthnet_v1" else _raster_records
    db_path = partial / lmdb_name(fmt)
    partial.mkdir(parents=True, exist_ok=True)
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
            blobs, row = records(ds, index)
            encoded = {key: save_safetensors(tensors) for key, tensors in blobs.items()}
            sha = {key: _sha(blob) for key, blob in encoded.items()}
            row["sha256"] = json.dumps(sha)
            pending_items.extend((key.encode(), blob) for key, blob in encoded.items())
            pending_records.append({"sample": sample, "sha256": sha, "row": row})
            rows.append(row)
            new += 1
            if len(pending_records) >= chunk:
                flush()
        flush()
        # -- verification: every blob re-read and re-hashed; the key count matches
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
    except KeyboardInterrupt:
        flush()  # the samples read completely before Ctrl-C are kept too (a second Ctrl-C here loses only them)
        raise
    finally:
        env.close()
    table = pd.DataFrame(rows)
    if fmt == "bigearthnet_v1":
        _add_snow_cloud_flags(table, Path(root))
    table.to_parquet(partial / METADATA_FILE, index=False)
    manifest = {"pack_version": PACK_VERSION, "format": fmt, "source": str(Path(root).resolve()),
                "lmdb": lmdb_name(fmt), "samples": len(rows), "keys": len(expected),
                "modalities": list(ds.modalities), "bands": {m: list(ds.bands[m]) for m in ds.modalities},
                "metadata_sha256": _sha((partial / METADATA_FILE).read_bytes())}
    if isinstance(ds, RasterDataset):
        manifest.update(task=ds.task, num_classes=ds.num_classes, classes=list(ds.classes),
                        ignore_index=ds.ignore_index,
                        stats={m: {b: list(v) for b, v in ds.stats[m].items()} for m in ds.modalities},
                        available_bands={m: list(ds.bands[m]) for m in ds.modalities})
    else:
        manifest.update(task="multilabel", num_classes=len(BIGEARTHNET_CLASSES), classes=list(BIGEARTHNET_CLASSES))
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, out)
    (out / PROGRESS).unlink()  # after the rename: until then an interrupted pack still resumes from the log
    return {"status": "packed", "out": str(out), "samples": len(rows), "keys": len(expected), "new": new,
            "resumed_verified": verified_resume, "wall_s": round(time.perf_counter() - t0, 3)}


def _add_snow_cloud_flags(table: pd.DataFrame, root: Path) -> None:
    from .bigearthnet import _read_patch_csv

    for column, file_name in (("contains_seasonal_snow", "patches_with_seasonal_snow.csv"),
                              ("contains_cloud_or_shadow", "patches_with_cloud_and_shadow.csv")):
        listed = {row[0] for row in _read_patch_csv(root / file_name)} if (root / file_name).is_file() else set()
        table[column] = table["patch_id"].isin(listed)


def verify_pack(out: str | os.PathLike) -> dict:
    """Re-reads every blob of a finished pack and checks counts and checksums; raises PackError on a mismatch."""
    out = Path(out)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise PackError(f"{out} is not a finished pack: {MANIFEST} missing")
    manifest = json.loads(manifest_path.read_text())
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


class PackedDataset(RasterDataset):
    """Reads a `sen12ms` / `seg_tiles` pack: the same samples as the source reader, from one LMDB.

    `bands` selects/reorders by name among the packed bands; statistics are the pack's unless `stats` overrides
    them. (A `bigearthnet_v1` pack is read by `BigEarthNetV2`.)"""

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str] | None = None,
                 modalities: Sequence[str] | None = None, normalize: bool = True,
                 bands: Mapping[str, Sequence[str]] | None = None,
                 stats: Mapping[str, Mapping[str, tuple[float, float]]] | None = None, on_error: str = "raise"):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"not a finished pack: {manifest_path} missing (an interrupted pack is "
                                    f"{self.root.name}.partial; run `mmfuse data pack` again to finish it)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest["format"] == "bigearthnet_v1":
            raise DataError(f"{self.root} is a BigEarthNet pack: read it with BigEarthNetV2 (data.dataset: "
                            f"bigearthnet_v2)")
        self.task = self.manifest["task"]
        self.num_classes, self.classes = self.manifest["num_classes"], tuple(self.manifest["classes"])
        self.ignore_index = self.manifest["ignore_index"]
        self.available_bands = {m: tuple(b) for m, b in self.manifest["bands"].items()}
        table = pd.read_parquet(self.root / METADATA_FILE)
        if split is not None:
            table = table[table["split"].isin(resolve_splits(split, self.root))]
        self.ids = list(table["id"])
        self.split_of = dict(zip(table["id"], table["split"]))
        # scene packs: every sample's class from the metadata, so label subsets are drawn without reading samples
        self.labels = (np.asarray(table["label"], dtype=np.int64)
                       if self.task == "scene" and "label" in table.columns else None)
        merged = {m: {b: tuple(v) for b, v in s.items()} for m, s in self.manifest["stats"].items()}
        for m, s in (stats or {}).items():
            merged.setdefault(m, {}).update(s)
        self._setup(modalities or list(self.available_bands), bands, normalize, merged, on_error)
        self.lmdb_path = self.root / self.manifest["lmdb"]
        self._env, self._env_pid = None, None
        self._select = {m: [self.available_bands[m].index(b) for b in self.bands[m]] for m in self.modalities}
        self._identity = {m: self._select[m] == list(range(len(self.available_bands[m]))) for m in self.modalities}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_env"] = None
        return state

    def read_raw(self, index: int) -> dict:
        from safetensors.numpy import load as load_safetensors

        if self._env is None or self._env_pid != os.getpid():
            self._env, self._env_pid = shared_lmdb_env(self.lmdb_path), os.getpid()
        key = self.ids[index]
        with self._env.begin(buffers=True) as txn:
            blob = txn.get(key.encode())
            if blob is None:
                raise DataFileError(f"sample {key}: key missing from the LMDB {self.lmdb_path}")
            try:
                tensors = load_safetensors(bytes(blob))
            except Exception as error:
                raise DataFileError(f"sample {key}: corrupt blob in {self.lmdb_path} ({error})") from None
        out = {m: tensors[m] if self._identity[m] else tensors[m][self._select[m]] for m in self.modalities}
        label = tensors["label"]
        out["label"] = label.reshape(()) if self.task == "scene" else label
        return out
