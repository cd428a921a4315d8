"""BigEarthNet readers: v2 (reBEN, LMDB + safetensors) and v1 (GeoTIFF folders), S1 + S2, 19-class multi-label.

Both readers return `{"s1": (2,120,120), "s2": (12,120,120), "label": (19,), "id": str}` (float32 tensors; only the
requested modalities). 20 m and 60 m S2 bands are upsampled to 120 x 120 with bilinear interpolation
(align_corners=False, antialias=False); 10 m bands are returned unchanged.

Bad samples raise `BigEarthNetDataError` naming the patch and the problem. With `on_error="skip"` a bad sample is
replaced, deterministically, by the next valid index (wrapping around): `ds[i]` warns once per bad sample, and
`ds.skipped` counts the distinct bad samples this process has met (each DataLoader worker keeps its own count).
Metadata problems (unknown label strings) are found when the dataset is built; in skip mode those rows are
dropped there and counted in `ds.skipped` as well.
"""

from __future__ import annotations

import csv
import json
import operator
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmfuse_fast.errors import BigEarthNetDataError, ConfigError, DataError

from .bands import PATCH_SIZE_PX, band_mean_std, native_size_px, resolve_bands, resolve_modalities

# The 19-class nomenclature of Sumbul et al. 2021 ("BigEarthNet-MM", IEEE GRSM), in the paper's order. This order
# is the label order of every multi-hot vector in this project.
BIGEARTHNET_CLASSES: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# The 43 CORINE Land Cover level-3 classes of BigEarthNet v1, in the official label-index order.
CORINE_43_CLASSES: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)

# Official 43 -> 19 mapping (BigEarthNet-19 `label_indices.json`, "label_conversion"). The 11 classes missing
# here (roads, ports, airports, mines, dumps, construction, green urban, sport, bare rock, burnt areas,
# intertidal flats) are not part of the 19-class nomenclature and are dropped.
_CORINE_43_TO_19_BY_INDEX: dict[int, int] = {
    0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6, 21: 7, 22: 8, 23: 9,
    24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15, 35: 16, 36: 16, 38: 17, 39: 17,
    40: 18, 41: 18, 42: 18,
}  # fmt: skip
CORINE_43_TO_19: dict[str, str | None] = {
    name: (BIGEARTHNET_CLASSES[_CORINE_43_TO_19_BY_INDEX[i]] if i in _CORINE_43_TO_19_BY_INDEX else None)
    for i, name in enumerate(CORINE_43_CLASSES)
}

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def label_key(name: str) -> str:
    """Spelling-insensitive key of a class name: "Transitional woodland/shrub" ~ "Transitional woodland, shrub"."""
    key = name.strip().lower().replace("-", " ")
    key = re.sub(r"\s*[,/]\s*", ",", key)
    return re.sub(r"\s+", " ", key)


_CLASS_INDEX = {label_key(name): i for i, name in enumerate(BIGEARTHNET_CLASSES)}
_CORINE_KEY_TO_19 = {label_key(name): target for name, target in CORINE_43_TO_19.items()}


def class_index(label: str, patch_id: str = "?") -> int:
    """Index of a 19-class label string in `BIGEARTHNET_CLASSES` (spelling variants of v1/v2 accepted)."""
    try:
        return _CLASS_INDEX[label_key(label)]
    except KeyError:
        raise BigEarthNetDataError(
            f"patch {patch_id}: unknown label {label!r} (not one of the 19 BigEarthNet classes)"
        ) from None


def labels_to_multi_hot(labels: Sequence[str], patch_id: str = "?") -> np.ndarray:
    multi_hot = np.zeros(len(BIGEARTHNET_CLASSES), dtype=np.float32)
    for label in labels:
        multi_hot[class_index(label, patch_id)] = 1.0
    return multi_hot


def corine_43_to_19(labels: Sequence[str], patch_id: str = "?") -> list[str]:
    """Map CORINE (43-class) label strings to 19-class names; classes outside the nomenclature are dropped.

    A label that is already a 19-class name passes through; anything else is an error naming the patch."""
    mapped = []
    for label in labels:
        key = label_key(label)
        if key in _CORINE_KEY_TO_19:
            target = _CORINE_KEY_TO_19[key]
        elif key in _CLASS_INDEX:
            target = BIGEARTHNET_CLASSES[_CLASS_INDEX[key]]
        else:
            raise BigEarthNetDataError(
                f"patch {patch_id}: unknown label {label!r} (neither a CORINE 43-class nor a 19-class name)"
            )
        if target is not None and target not in mapped:
            mapped.append(target)
    return mapped


def canonical_split(name, where: str) -> str:
    """The canonical name of split `name` ("val" -> "validation"); a DataError naming it, `where` it was asked
    for (a dataset root, a split_files option) and the valid splits otherwise."""
    if name not in SPLIT_ALIASES:
        raise DataError(f"unknown split {name!r} ({where}); valid splits: train, validation (or val), test")
    return SPLIT_ALIASES[name]


def resolve_splits(split: str | Sequence[str] | None, root: str | os.PathLike = "?") -> tuple[str, ...]:
    """Canonical split names, each once; None is every split. Unknown names raise a DataError naming `root`."""
    if split is None:
        return SPLITS
    names = (split,) if isinstance(split, str) else tuple(split)
    resolved = []
    for name in names:
        name = canonical_split(name, f"dataset at {root}")
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        raise DataError(f"empty split list for the dataset at {root}")
    return tuple(resolved)


class SkipBadSamples:
    """`__getitem__` with the index check and skip-on-error of the dataset classes.

    The class sets `ids`, `on_error` ("raise" | "skip"), `skipped` (0), `_bad_indices` (an empty set) and implements
    `_load_sample(index) -> sample`, which raises `BigEarthNetDataError` for a bad sample. With `on_error="skip"` a
    bad sample is replaced by the next valid index (wrapping around), warned about once and counted in `skipped`;
    when every sample is bad, `_all_bad_error` is raised.
    """

    _all_bad_error: type[BigEarthNetDataError] = BigEarthNetDataError

    @staticmethod
    def check_on_error(on_error: str) -> str:
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"reader option on_error must be 'raise' or 'skip', got {on_error!r}")
        return on_error

    def _load_sample(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index %= len(self)
        if self.on_error == "raise":
            return self._load_sample(index)
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if candidate in self._bad_indices:
                continue
            try:
                return self._load_sample(candidate)
            except BigEarthNetDataError as error:
                self._bad_indices.add(candidate)
                self.skipped += 1
                warnings.warn(f"skipping bad sample {candidate} ({self.ids[candidate]}): {error}", stacklevel=2)
        raise self._all_bad_error(f"every one of the {len(self)} samples is bad (on_error='skip')")


class _BigEarthNetBase(SkipBadSamples, Dataset):
    """Shared sample assembly: band selection, resampling, validation, normalization and skip-on-error."""

    def __init__(self, modalities, normalize, bands, on_error, band_stats):
        self.check_on_error(on_error)
        self.modalities = resolve_modalities(modalities)
        self.bands = resolve_bands(self.modalities, bands)
        self.normalize = bool(normalize)
        self.on_error = on_error
        band_stats = band_stats or {}
        self._mean_std = {m: band_mean_std(m, self.bands[m], band_stats.get(m)) for m in self.modalities}
        self.skipped = 0
        self._bad_indices: set[int] = set()
        self.ids: list[str] = []
        self.labels = np.zeros((0, len(BIGEARTHNET_CLASSES)), dtype=np.float32)

    # subclasses: raw band arrays of sample `index` for one modality, keyed by band name
    def _read_bands(self, index: int, modality: str) -> Mapping[str, np.ndarray]:
        raise NotImplementedError

    def _source_name(self, index: int, modality: str) -> str:
        return self.ids[index]

    def __len__(self) -> int:
        return len(self.ids)

    def _load_sample(self, index: int) -> dict:
        sample = {}
        for modality in self.modalities:
            raw = self._read_bands(index, modality)
            image = self._assemble(raw, modality, self._source_name(index, modality))  # a fresh float32 array
            if self.normalize:  # in place: the same arithmetic as (image - mean) / std without two temporaries
                mean, std = self._mean_std[modality]
                np.subtract(image, mean, out=image)
                np.divide(image, std, out=image)
            sample[modality] = torch.from_numpy(image)
        sample["label"] = torch.from_numpy(self.labels[index].copy())
        sample["id"] = self.ids[index]
        return sample

    def _assemble(self, raw: Mapping[str, np.ndarray], modality: str, source: str) -> np.ndarray:
        """Stack the requested bands at 120 x 120 in channel order, after checking names, shapes and values.

        Returns a new C-contiguous float32 array (C, 120, 120) that the caller may modify in place."""
        bands = self.bands[modality]
        image = np.empty((len(bands), PATCH_SIZE_PX, PATCH_SIZE_PX), dtype=np.float32)
        to_resample: dict[int, list[tuple[int, np.ndarray]]] = {}  # side -> (channel, array): one call per size
        for position, band in enumerate(bands):
            if band not in raw:
                raise BigEarthNetDataError(f"{source}: band {band} is missing (present: {sorted(raw)})")
            array = np.asarray(raw[band])
            native = native_size_px(band)
            allowed = {(native, native), (PATCH_SIZE_PX, PATCH_SIZE_PX)}
            if array.shape not in allowed:
                raise BigEarthNetDataError(
                    f"{source}: band {band} has shape {array.shape}, expected one of {sorted(allowed)}"
                )
            array = array.astype(np.float32, copy=False)  # no copy for float32 (S1) bands
            # integers (S2 DN) are finite whatever their value: only float bands need the check
            if raw[band].dtype.kind not in "iub" and not np.isfinite(array).all():
                raise BigEarthNetDataError(f"{source}: band {band} contains NaN or infinite values")
            if array.shape[0] == PATCH_SIZE_PX:
                image[position] = array
            else:
                to_resample.setdefault(array.shape[0], []).append((position, array))
        for group in to_resample.values():
            stack = torch.from_numpy(np.stack([array for _, array in group]))[None]
            upsampled = F.interpolate(
                stack, size=(PATCH_SIZE_PX, PATCH_SIZE_PX), mode="bilinear", align_corners=False, antialias=False
            )[0].numpy()
            image[[position for position, _ in group]] = upsampled
        return image

    def _labels_from_lists(self, ids: Sequence[str], label_lists: Sequence[Sequence[str]]) -> list:
        """Multi-hot labels; rows with unknown labels raise, or in skip mode are marked None and counted."""
        rows = []
        for patch_id, labels in zip(ids, label_lists):
            try:
                rows.append(labels_to_multi_hot(list(labels), patch_id))
            except BigEarthNetDataError as error:
                if self.on_error == "raise":
                    raise
                warnings.warn(f"skipping patch {patch_id}: {error}", stacklevel=3)
                self.skipped += 1
                rows.append(None)
        return rows


# ---------------------------------------------------------------------------------------------------------------
# BigEarthNet v2 (reBEN): LMDB of safetensors blobs + metadata parquet files


METADATA_FILE = "metadata.parquet"
SNOW_CLOUD_METADATA_FILE = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"


def find_lmdb_dir(root: Path) -> Path:
    """The folder under `root` (or `root` itself) holding the LMDB `data.mdb`."""
    if (root / "data.mdb").is_file():
        return root
    candidates = sorted(p.parent for p in root.glob("*/data.mdb"))
    if not candidates:
        raise FileNotFoundError(f"no LMDB found: neither {root}/data.mdb nor {root}/*/data.mdb exists")
    preferred = [c for c in candidates if c.name == "BigEarthNet-V2-LMDB"]
    if len(candidates) > 1 and not preferred:
        raise FileNotFoundError(f"several LMDB folders under {root}: {[str(c) for c in candidates]}; pass one root")
    return (preferred or candidates)[0]


# py-lmdb refuses to open one environment twice in a process (LMDB's locks are per process and file), so every
# dataset reading the same LMDB in a process shares one read-only handle. A handle inherited through fork() (a
# DataLoader worker) is closed in the child and reopened: LMDB handles must not be used across fork().
_LMDB_ENVS: dict[str, tuple[int, tuple[int, int], object]] = {}


def shared_lmdb_env(path: str | os.PathLike):
    """This process's read-only handle on the LMDB folder `path` (opened on first use)."""
    import lmdb

    key = str(Path(path).resolve())
    data_file = os.stat(Path(key) / "data.mdb")
    file_id = (data_file.st_dev, data_file.st_ino)
    cached = _LMDB_ENVS.get(key)
    if cached is not None:
        pid, cached_file_id, env = cached
        if pid == os.getpid() and cached_file_id == file_id:
            return env
        env.close()  # inherited from the parent process, or the files were replaced
    env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    _LMDB_ENVS[key] = (os.getpid(), file_id, env)
    return env


class BigEarthNetV2(_BigEarthNetBase):
    """BigEarthNet v2 (reBEN) from the official LMDB + `metadata.parquet`.

    `root/` holds the LMDB folder (any sub-folder with `data.mdb`, normally `BigEarthNet-V2-LMDB/`),
    `metadata.parquet` and optionally `metadata_for_patches_with_snow_cloud_or_shadow.parquet`, whose rows are
    included unless `drop_snow_cloud=True`. `split`: a name, a sequence of names, or None for all.
    `bands`: optional {modality: [band names]} to select/reorder bands. `band_stats`: optional
    {modality: {band: (mean, std)}} overriding the default normalization statistics.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = "train",
        modalities: Sequence[str] = ("s1", "s2"),
        normalize: bool = True,
        drop_snow_cloud: bool = False,
        bands: Mapping[str, Sequence[str]] | None = None,
        on_error: str = "raise",
        band_stats: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    ):
        super().__init__(modalities, normalize, bands, on_error, band_stats)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"BigEarthNet v2 root not found: {self.root}")
        self.splits = resolve_splits(split, self.root)
        self.lmdb_path = find_lmdb_dir(self.root)
        self._every_split = split is None  # also rows without a split (a pack of BigEarthNet v1 with split=None)
        self.drop_snow_cloud = bool(drop_snow_cloud)
        self.metadata = self._read_metadata()
        label_rows = self._labels_from_lists(list(self.metadata["patch_id"]), list(self.metadata["labels"]))
        keep = [row is not None for row in label_rows]
        self.metadata = self.metadata[keep].reset_index(drop=True)
        self.labels = np.stack([r for r in label_rows if r is not None]) if any(keep) else self.labels
        self.ids = list(self.metadata["patch_id"])
        self._s1_names = list(self.metadata["s1_name"])
        self.split_of = dict(zip(self.metadata["patch_id"], self.metadata["split"]))
        self._env = None
        self._env_pid = None

    def _read_metadata(self) -> pd.DataFrame:
        metadata_path = self.root / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(f"BigEarthNet v2 metadata not found: {metadata_path}")
        tables = [pd.read_parquet(metadata_path)]
        snow_cloud_path = self.root / SNOW_CLOUD_METADATA_FILE
        if snow_cloud_path.is_file() and not self.drop_snow_cloud:
            tables.append(pd.read_parquet(snow_cloud_path))
        metadata = pd.concat(tables, ignore_index=True)
        required = {"patch_id", "labels", "split", "s1_name"}
        missing = required - set(metadata.columns)
        if missing:
            raise BigEarthNetDataError(f"{metadata_path}: missing columns {sorted(missing)}")
        duplicated = metadata["patch_id"][metadata["patch_id"].duplicated()]
        if len(duplicated):
            raise BigEarthNetDataError(f"patch {duplicated.iloc[0]} appears twice in the metadata under {self.root}")
        if self.drop_snow_cloud:
            flags = [c for c in ("contains_seasonal_snow", "contains_cloud_or_shadow") if c in metadata.columns]
            for column in flags:
                metadata = metadata[~metadata[column].astype(bool)]
        unknown = sorted(set(metadata["split"].dropna()) - set(SPLITS))
        if unknown:
            raise BigEarthNetDataError(f"{metadata_path}: unknown split names {unknown}")
        if not self._every_split:
            metadata = metadata[metadata["split"].isin(self.splits)]
        return metadata.reset_index(drop=True)

    def _transaction_env(self):
        if self._env is None or self._env_pid != os.getpid():
            self._env = shared_lmdb_env(self.lmdb_path)
            self._env_pid = os.getpid()
        return self._env

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_env"] = None
        state["_env_pid"] = None
        return state

    def _source_name(self, index: int, modality: str) -> str:
        key = self.ids[index] if modality == "s2" else self._s1_names[index]
        return f"patch {self.ids[index]} ({modality} key {key})"

    def _read_bands(self, index: int, modality: str) -> Mapping[str, np.ndarray]:
        from safetensors.numpy import load as load_safetensors

        key = self.ids[index] if modality == "s2" else self._s1_names[index]
        with self._transaction_env().begin(buffers=False) as txn:
            blob = txn.get(key.encode())
        if blob is None:
            raise BigEarthNetDataError(
                f"{self._source_name(index, modality)}: key missing from the LMDB {self.lmdb_path}"
            )
        try:
            return load_safetensors(blob)
        except Exception as error:  # safetensors raises several types for corrupt headers/bodies
            raise BigEarthNetDataError(
                f"{self._source_name(index, modality)}: corrupt LMDB value, not a safetensors blob ({error})"
            ) from None


# ---------------------------------------------------------------------------------------------------------------
# BigEarthNet v1: GeoTIFF folders (BigEarthNet-S1-v1.0/, BigEarthNet-v1.0/)

_S1_FOLDERS = ("BigEarthNet-S1-v1.0", "BigEarthNet-S1-v1.0-Example", "BigEarthNet-S1-Example")
_S2_FOLDERS = ("BigEarthNet-v1.0", "BigEarthNet-v1.0-Example", "BigEarthNet-Example")
_SPLIT_FILES = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
_SNOW_CLOUD_FILES = ("patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv")
_CSV_HEADER_WORDS = {"s2", "s1", "s2_name", "s1_name", "patch_id", "patch", "name", "s2_patch", "s1_patch"}


def _read_patch_csv(path: Path) -> list[list[str]]:
    """Rows of a BigEarthNet patch list: one S2 name per line, or `s2,s1` pairs; an optional header is skipped."""
    with open(path, newline="") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if row and row[0].strip()]
    if rows and rows[0][0].lower() in _CSV_HEADER_WORDS:
        rows = rows[1:]
    return rows


def _first_existing(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


class BigEarthNetV1(_BigEarthNetBase):
    """BigEarthNet v1 from the GeoTIFF folders, labels mapped from the 43 CORINE classes to the 19 classes.

    Pairs and labels come from the S1 patches' `<s1>_labels_metadata.json` (`labels`, `corresponding_s2_patch`);
    with only "s2" requested and no S1 folder, from the S2 patches' `<s2>_labels_metadata.json`.
    `split`: a name, names, or None for every patch found. Split lists are `split_files={split: path}` or
    `train.csv`/`val.csv`/`test.csv` in `root` (S2 names, one per line, or `s2,s1` pairs).
    `drop_snow_cloud` removes the S2 patches listed in `patches_with_seasonal_snow.csv` and
    `patches_with_cloud_and_shadow.csv` (found in `root`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = None,
        modalities: Sequence[str] = ("s1", "s2"),
        normalize: bool = True,
        drop_snow_cloud: bool = False,
        bands: Mapping[str, Sequence[str]] | None = None,
        on_error: str = "raise",
        split_files: Mapping[str, str | os.PathLike] | None = None,
        band_stats: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    ):
        super().__init__(modalities, normalize, bands, on_error, band_stats)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"BigEarthNet v1 root not found: {self.root}")
        self.splits = None if split is None else resolve_splits(split, self.root)  # before the slow indexing
        self.s1_dir = _first_existing(self.root, _S1_FOLDERS)
        self.s2_dir = _first_existing(self.root, _S2_FOLDERS)
        if "s1" in self.modalities and self.s1_dir is None:
            raise FileNotFoundError(f"no Sentinel-1 folder under {self.root} (looked for {list(_S1_FOLDERS)})")
        if "s2" in self.modalities and self.s2_dir is None:
            raise FileNotFoundError(f"no Sentinel-2 folder under {self.root} (looked for {list(_S2_FOLDERS)})")
        self.drop_snow_cloud = bool(drop_snow_cloud)

        pairs = self._index_patches()  # s2 name -> (s1 name or None, 19-class labels or an error)
        selected = self._select_patches(pairs, split_files)
        if self.drop_snow_cloud:
            excluded = self._snow_cloud_patches()
            selected = [(s2, split_name) for s2, split_name in selected if s2 not in excluded]

        ids, s1_names, split_names, label_rows = [], [], [], []
        for s2_name, split_name in selected:
            s1_name, labels = pairs[s2_name]
            if isinstance(labels, BigEarthNetDataError):
                if self.on_error == "raise":
                    raise labels
                warnings.warn(f"skipping patch {s2_name}: {labels}", stacklevel=2)
                self.skipped += 1
                continue
            ids.append(s2_name)
            s1_names.append(s1_name)
            split_names.append(split_name)
            label_rows.append(labels_to_multi_hot(labels, s2_name))
        self.ids = ids
        self._s1_names = s1_names
        self.labels = np.stack(label_rows) if label_rows else self.labels
        self.split_of = dict(zip(ids, split_names))
        self.metadata = pd.DataFrame({"patch_id": ids, "s1_name": s1_names, "split": split_names})

    def _index_patches(self) -> dict[str, tuple[str | None, list[str] | BigEarthNetDataError]]:
        pairs = {}
        if self.s1_dir is not None:
            for folder in sorted(p for p in self.s1_dir.iterdir() if p.is_dir()):
                meta = self._read_json(folder / f"{folder.name}_labels_metadata.json")
                s2_name = meta.get("corresponding_s2_patch")
                if not s2_name:
                    raise BigEarthNetDataError(f"{folder}: labels metadata has no 'corresponding_s2_patch'")
                pairs[s2_name] = (folder.name, self._mapped_labels(meta, f"{s2_name} (S1 patch {folder.name})"))
        else:
            for folder in sorted(p for p in self.s2_dir.iterdir() if p.is_dir()):
                meta = self._read_json(folder / f"{folder.name}_labels_metadata.json")
                pairs[folder.name] = (None, self._mapped_labels(meta, folder.name))
        return pairs

    @staticmethod
    def _read_json(path: Path) -> dict:
        if not path.is_file():
            raise FileNotFoundError(f"BigEarthNet v1 labels metadata not found: {path}")
        try:
            with open(path) as handle:
                return json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BigEarthNetDataError(f"{path}: not valid JSON ({error})") from None

    @staticmethod
    def _mapped_labels(meta: dict, patch_name: str) -> list[str] | BigEarthNetDataError:
        if "labels" not in meta:
            return BigEarthNetDataError(f"patch {patch_name}: labels metadata has no 'labels'")
        try:
            return corine_43_to_19(meta["labels"], patch_name)
        except BigEarthNetDataError as error:
            return error

    def _select_patches(self, pairs, split_files) -> list[tuple[str, str | None]]:
        split_files = {canonical_split(k, "in split_files"): Path(v) for k, v in (split_files or {}).items()}
        for name, file_name in _SPLIT_FILES.items():
            if name not in split_files and (self.root / file_name).is_file():
                split_files[name] = self.root / file_name
        if self.splits is None:
            # every patch found; its split is known when a split list names it
            split_of = {}
            for name, path in split_files.items():
                for row in _read_patch_csv(path):
                    split_of.setdefault(row[0], name)
            return [(s2, split_of.get(s2)) for s2 in pairs]
        selected = []
        for name in self.splits:
            if name not in split_files:
                raise FileNotFoundError(
                    f"no split list for split {name!r}: pass split_files={{{name!r}: path}} or put "
                    f"{_SPLIT_FILES[name]} in {self.root}"
                )
            path = split_files[name]
            if not path.is_file():
                raise FileNotFoundError(f"split list for {name!r} not found: {path}")
            for row in _read_patch_csv(path):
                s2_name = row[0]
                if s2_name not in pairs:
                    raise BigEarthNetDataError(
                        f"patch {s2_name} (listed in {path}) has no labels metadata under {self.root}"
                    )
                if len(row) > 1 and pairs[s2_name][0] is not None and row[1] != pairs[s2_name][0]:
                    raise BigEarthNetDataError(
                        f"patch {s2_name}: {path} pairs it with {row[1]}, the S1 metadata with {pairs[s2_name][0]}"
                    )
                selected.append((s2_name, name))
        return selected

    def _snow_cloud_patches(self) -> set[str]:
        excluded = set()
        found = False
        for file_name in _SNOW_CLOUD_FILES:
            path = self.root / file_name
            if path.is_file():
                found = True
                excluded.update(row[0] for row in _read_patch_csv(path))
        if not found:
            warnings.warn(f"drop_snow_cloud=True but none of {list(_SNOW_CLOUD_FILES)} is in {self.root}", stacklevel=3)
        return excluded

    def _band_path(self, index: int, modality: str, band: str) -> Path:
        if modality == "s2":
            name = self.ids[index]
            return self.s2_dir / name / f"{name}_{band}.tif"
        name = self._s1_names[index]
        if name is None:
            raise BigEarthNetDataError(f"patch {self.ids[index]}: no Sentinel-1 patch is paired with it")
        return self.s1_dir / name / f"{name}_{band}.tif"

    def _source_name(self, index: int, modality: str) -> str:
        return f"patch {self.ids[index]} ({modality})"

    def _read_bands(self, index: int, modality: str) -> Mapping[str, np.ndarray]:
        import rasterio
        from rasterio.errors import RasterioError

        arrays = {}
        for band in self.bands[modality]:
            path = self._band_path(index, modality, band)
            if not path.is_file():
                raise BigEarthNetDataError(f"patch {self.ids[index]}: band file missing: {path}")
            try:
                with rasterio.open(path) as source:
                    arrays[band] = source.read(1)
            except RasterioError as error:
                raise BigEarthNetDataError(
                    f"patch {self.ids[index]}: corrupt or unreadable GeoTIFF {path} ({error})"
                ) from None
            # the generic shape error would name the band; name the file instead, that is what the user must fix
            native = native_size_px(band)
            if arrays[band].shape not in {(native, native), (PATCH_SIZE_PX, PATCH_SIZE_PX)}:
                raise BigEarthNetDataError(
                    f"patch {self.ids[index]}: {path} has size {arrays[band].shape}, expected ({native}, {native})"
                )
        return arrays
