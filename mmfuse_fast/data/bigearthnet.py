"""BigEarthNet readers: v2 (reBEN, LMDB + safetensors) and v1 (GeoTIFF folders), S1 + S2, 19-class multi-label.

Both readers return `{"s1": (2,120,120), "s2": (12,120,120), "label": (19,), "id": str}` (float32 tensors; only the
requested modalities). 20 m and 60 m S2 bands are upsampled to 120 x 120 with bilinear interpolation
(align_corners=False, antialias=False); 10 m bands are returned unchanged.

Pixels at a band's declared nodata value are NaN in physical values and 0 (the band mean) once normalized.

Bad samples raise `BigEarthNetDataError` (a `DataFileError` for a band file) naming the patch and the problem. With
`on_error="skip"` a bad sample is replaced, deterministically, by the next valid index (wrapping around): `ds[i]`
warns once per bad sample. Metadata problems (null cells, unknown label strings, unreadable labels metadata) are
found when the dataset is built; in skip mode those rows are dropped there. `ds.skipped` counts both, over this
process and its DataLoader workers (`mmfuse_fast.data.base`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mmfuse_fast.errors import BigEarthNetDataError, DataError, DataFileError

from .bands import BAND_STATS, MODALITY_BANDS, PATCH_SIZE_PX, native_size_px
from .base import BandDataset, resolve_stats
from .blob_store import BlobStore, find_lmdb_dir
from .geotiff import RasterInfo, check_same_grid, read_raster
from .splits import (ALL, SPLIT_ALIASES, SPLITS, canonical_split, find_list_file, find_split_files,
                     missing_split_list_error, read_split_rows, resolve_splits, selects_all)

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


class _BigEarthNetBase(BandDataset):
    """Shared sample assembly: band selection, resampling, validation, nodata, normalization, skip-on-error."""

    _all_bad_error = BigEarthNetDataError

    def __init__(self, modalities, bands, normalize, stats, on_error):
        self.select_bands(modalities, MODALITY_BANDS, bands, normalize, on_error)
        given = resolve_stats(stats, MODALITY_BANDS, self.bands)
        self.set_mean_std({m: {**BAND_STATS[m], **given.get(m, {})} for m in self.modalities})
        self.ids: list[str] = []
        self.s1_names: list[str | None] = []
        self.labels = np.zeros((0, len(BIGEARTHNET_CLASSES)), dtype=np.float32)

    @property
    def _s1_names(self) -> list[str | None]:  # the name pack.py reads
        return self.s1_names

    def read_bands(self, index: int, modality: str) -> dict[str, np.ndarray]:
        """The requested bands of one modality of sample `index`, as stored (native resolution and dtype)."""
        return self.read_bands_and_nodata(index, modality)[0]

    _read_bands = read_bands  # the name pack.py reads

    def read_bands_and_nodata(self, index: int, modality: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """(`read_bands`, {band: the nodata value its file declares, for the bands that declare one})."""
        raise NotImplementedError

    def _read_sample_bands(self, index: int) -> dict[str, tuple[dict[str, np.ndarray], dict[str, float]]]:
        return {m: self.read_bands_and_nodata(index, m) for m in self.modalities}

    def _source_name(self, index: int, modality: str) -> str:
        return f"patch {self.ids[index]} ({modality})"

    def _load_sample(self, index: int) -> dict:
        sample = {}
        for modality, (raw, nodata) in self._read_sample_bands(index).items():
            image, has_nodata = self._assemble(raw, nodata, modality, self._source_name(index, modality))
            if self.normalize:
                self.normalize_in_place(image, modality)
                if has_nodata:  # nodata pixels become the band mean, as in the raster readers
                    np.nan_to_num(image, copy=False, nan=0.0)
            sample[modality] = torch.from_numpy(image)
        sample["label"] = torch.from_numpy(self.labels[index].copy())
        sample["id"] = self.ids[index]
        return sample

    def _assemble(self, raw: Mapping[str, np.ndarray], nodata: Mapping[str, float], modality: str,
                  source: str) -> tuple[np.ndarray, bool]:
        """The requested bands stacked at 120 x 120 in channel order, after checking names, shapes and values;
        pixels at a band's declared nodata value are NaN. Returns (a new C-contiguous float32 (C, 120, 120) array
        the caller may modify in place, whether any pixel is nodata)."""
        bands = self.bands[modality]
        image = np.empty((len(bands), PATCH_SIZE_PX, PATCH_SIZE_PX), dtype=np.float32)
        to_resample: dict[int, list[tuple[int, np.ndarray]]] = {}  # side -> (channel, array): one call per size
        has_nodata = False
        for position, band in enumerate(bands):
            if band not in raw:
                raise BigEarthNetDataError(f"{source}: band {band} is missing (present: {sorted(raw)})")
            stored = np.asarray(raw[band])
            native = native_size_px(band)
            allowed = {(native, native), (PATCH_SIZE_PX, PATCH_SIZE_PX)}
            if stored.shape not in allowed:
                raise BigEarthNetDataError(
                    f"{source}: band {band} has shape {stored.shape}, expected one of {sorted(allowed)}"
                )
            array = stored.astype(np.float32, copy=False)  # no copy for float32 (S1) bands
            missing_value = nodata.get(band)
            # integers (S2 DN) are finite whatever their value: only float bands need the check; NaN is fine in
            # a band that declares NaN its nodata value
            if stored.dtype.kind not in "iub" and not np.isfinite(array).all():
                declared_nan = missing_value is not None and math.isnan(missing_value)
                if not declared_nan or np.isinf(array).any():
                    raise BigEarthNetDataError(f"{source}: band {band} contains NaN or infinite values")
                has_nodata = True
            if missing_value is not None and not math.isnan(missing_value):
                mask = stored == missing_value
                if mask.any():
                    array = np.where(mask, np.float32(np.nan), array)
                    has_nodata = True
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
        return image, has_nodata

    def _drop_row(self, error: BigEarthNetDataError) -> None:
        """A metadata row that cannot become a sample: raised, or in skip mode warned about and counted."""
        if self.on_error == "raise":
            raise error
        warnings.warn(f"skipping {error}", stacklevel=3)
        self._rows_dropped += 1

    def _labels_from_lists(self, ids: Sequence[str], label_lists: Sequence, where: str) -> list:
        """Multi-hot labels; rows with missing or unknown labels raise, or in skip mode are None and counted."""
        rows = []
        for patch_id, labels in zip(ids, label_lists):
            try:
                rows.append(labels_to_multi_hot(label_list(labels, f"patch {patch_id} in {where}"), patch_id))
            except BigEarthNetDataError as error:
                self._drop_row(error)
                rows.append(None)
        return rows

    def _require_samples(self, split, where: str) -> None:
        if not self.ids:
            raise BigEarthNetDataError(f"split {split!r} selects no patch of {where}"
                                       + (f" ({self._rows_dropped} skipped as bad)" if self._rows_dropped else ""))


def label_list(labels, where: str) -> list[str]:
    """`labels` of a metadata row as a list of strings; a null cell or another type is an error naming `where`."""
    if labels is None or isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise BigEarthNetDataError(f"{where}: 'labels' is {labels!r}, not a list of class names")
    labels = list(labels)
    if not all(isinstance(label, str) for label in labels):
        raise BigEarthNetDataError(f"{where}: 'labels' holds non-text entries {labels!r}")
    return labels


# ---------------------------------------------------------------------------------------------------------------
# BigEarthNet v2 (reBEN): LMDB of safetensors blobs + metadata parquet files

METADATA_FILE = "metadata.parquet"
SNOW_CLOUD_METADATA_FILE = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"


class BigEarthNetV2(_BigEarthNetBase):
    """BigEarthNet v2 (reBEN) from the official LMDB + `metadata.parquet`.

    `root/` holds the LMDB folder (any sub-folder with `data.mdb`, normally `BigEarthNet-V2-LMDB/`),
    `metadata.parquet` and optionally `metadata_for_patches_with_snow_cloud_or_shadow.parquet`, whose rows are
    included unless `drop_snow_cloud=True`. `split`: a name, a list of names, or "all" (None) for every row,
    including rows without a split (a pack of BigEarthNet v1 made without split lists). A metadata row with a
    null `labels` or `s1_name` cell, or unknown labels, raises naming the file and patch (or is skipped and counted
    with `on_error="skip"`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = "train",
        modalities: Sequence[str] = ("s1", "s2"),
        bands: Mapping[str, Sequence[str]] | None = None,
        normalize: bool = True,
        stats: Mapping[str, Mapping[str, tuple[float, float]] | str] | None = None,
        on_error: str = "raise",
        drop_snow_cloud: bool = False,
    ):
        self.root = Path(root)
        super().__init__(modalities, bands, normalize, stats, on_error)
        if not self.root.is_dir():
            raise FileNotFoundError(f"BigEarthNet v2 root not found: {self.root}")
        self.splits = resolve_splits(split, self.root)
        self.lmdb_path = find_lmdb_dir(self.root)
        self._every_split = selects_all(split)
        self.drop_snow_cloud = bool(drop_snow_cloud)
        self.metadata = self._read_metadata()
        label_rows = self._labels_from_lists(list(self.metadata["patch_id"]), list(self.metadata["labels"]),
                                             self.root / METADATA_FILE)
        keep = [row is not None for row in label_rows]
        self.metadata = self.metadata[keep].reset_index(drop=True)
        self.labels = np.stack([r for r in label_rows if r is not None]) if any(keep) else self.labels
        self.ids = list(self.metadata["patch_id"])
        self.s1_names = list(self.metadata["s1_name"])
        self.split_of = dict(zip(self.metadata["patch_id"], self.metadata["split"]))
        self._require_samples(split, f"the BigEarthNet v2 metadata under {self.root}")
        self.store = BlobStore(self.lmdb_path)
        self.track_skipped(self._rows_dropped)

    def _read_metadata(self) -> pd.DataFrame:
        metadata_path = self.root / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(f"BigEarthNet v2 metadata not found: {metadata_path}")
        paths = [metadata_path]
        snow_cloud_path = self.root / SNOW_CLOUD_METADATA_FILE
        if snow_cloud_path.is_file() and not self.drop_snow_cloud:
            paths.append(snow_cloud_path)
        required = ["patch_id", "labels", "split", "s1_name"]
        tables = []
        for path in paths:
            try:
                table = pd.read_parquet(path)
            except Exception as error:  # pyarrow raises several types for a corrupt or truncated file
                raise BigEarthNetDataError(f"{path}: unreadable parquet file ({error})") from None
            missing = [c for c in required if c not in table.columns]
            if missing:
                raise BigEarthNetDataError(f"{path}: missing columns {missing}")
            unnamed = table.index[table["patch_id"].isna()]
            if len(unnamed):
                raise BigEarthNetDataError(f"{path}: row {unnamed[0]} has no patch_id")
            tables.append(table.assign(metadata_file=str(path)))
        metadata = pd.concat(tables, ignore_index=True)
        duplicated = metadata["patch_id"][metadata["patch_id"].duplicated()]
        if len(duplicated):
            raise BigEarthNetDataError(f"patch {duplicated.iloc[0]} appears twice in the metadata under {self.root}")
        if self.drop_snow_cloud:
            flags = [c for c in ("contains_seasonal_snow", "contains_cloud_or_shadow") if c in metadata.columns]
            for column in flags:
                metadata = metadata[~metadata[column].fillna(False).astype(bool)]
        unknown = sorted(set(metadata["split"].dropna()) - set(SPLITS))
        if unknown:
            raise BigEarthNetDataError(f"{metadata_path}: unknown split names {unknown}")
        if not self._every_split:
            metadata = metadata[metadata["split"].isin(self.splits)]
        if "s1" in self.modalities:
            no_s1 = metadata["s1_name"].isna()
            for patch_id, path in zip(metadata["patch_id"][no_s1], metadata["metadata_file"][no_s1]):
                self._drop_row(BigEarthNetDataError(f"patch {patch_id} in {path}: 's1_name' is empty"))
            metadata = metadata[~no_s1]
        return metadata.reset_index(drop=True)

    def _lmdb_key(self, index: int, modality: str) -> str:
        return self.ids[index] if modality == "s2" else self.s1_names[index]

    def _source_name(self, index: int, modality: str) -> str:
        return f"patch {self.ids[index]} ({modality} key {self._lmdb_key(index, modality)})"

    def read_bands_and_nodata(self, index: int, modality: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        what = self._source_name(index, modality)
        with self.store.views(self._lmdb_key(index, modality), what, BigEarthNetDataError) as views:
            return {band: view.copy() for band, (view, _) in views.items()}, {}


# ---------------------------------------------------------------------------------------------------------------
# BigEarthNet v1: GeoTIFF folders, one per patch (BigEarthNet-S1-v1.0/, BigEarthNet-v1.0/ or any other names)

SNOW_CLOUD_LISTS = ("patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv")
_KIND_BANDS = {"s1": set(MODALITY_BANDS["s1"]), "s2": set(MODALITY_BANDS["s2"]) | {"B10"}}
_PATCH_FOLDERS_LOOKED_AT = 4  # patch folders a folder's first entries must include to be recognized
_SEARCH_DEPTH = 3  # folder levels under the root searched for the patch folders


def patch_folder_kind(folder: Path) -> str | None:
    """"s1" or "s2" when `folder` holds BigEarthNet v1 patch folders (`<name>/<name>_<band>.tif`), judged by its
    first few sub-folders; else None."""
    looked_at = 0
    try:
        entries = os.scandir(folder)
    except OSError:
        return None
    with entries:
        for entry in entries:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            prefix = entry.name + "_"
            with os.scandir(entry.path) as files:
                bands = {f.name[len(prefix):-4] for f in files if f.name.startswith(prefix) and f.name.endswith(".tif")}
            for kind, names in _KIND_BANDS.items():
                if bands & names:
                    return kind
            looked_at += 1
            if looked_at >= _PATCH_FOLDERS_LOOKED_AT:
                return None
    return None


def find_patch_folders(root: Path, kinds: Sequence[str] = ("s1", "s2")) -> dict[str, Path]:
    """{kind: folder} for the `kinds` ("s1", "s2") of the BigEarthNet v1 archive under `root` found by content (the
    root itself or a folder up to three levels down, whatever its name). Two folders of one kind is an error
    naming both."""
    found: dict[str, list[Path]] = {"s1": [], "s2": []}
    level = [root]
    for _ in range(_SEARCH_DEPTH + 1):
        below = []
        for folder in level:
            kind = patch_folder_kind(folder)
            if kind is not None:
                found[kind].append(folder)
            else:
                below.extend(sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
        level = below
    found = {kind: folders for kind, folders in found.items() if kind in kinds}
    for kind, folders in found.items():
        if len(folders) > 1:
            raise DataError(f"several Sentinel-{kind[1]} patch folders under {root}: "
                            f"{', '.join(str(f) for f in folders)}; pass {kind}_root to choose one")
    return {kind: folders[0] for kind, folders in found.items() if folders}


class BigEarthNetV1(_BigEarthNetBase):
    """BigEarthNet v1 from the GeoTIFF folders, labels mapped from the 43 CORINE classes to the 19 classes.

    The Sentinel-1 and Sentinel-2 patch folders are found by content under `root` (BigEarthNet-v1.0,
    BigEarthNet-S2-Example, or any other names), or given as `s1_root` / `s2_root`. Pairs and labels come from the
    S1 patches' `<s1>_labels_metadata.json` (`labels`, `corresponding_s2_patch`); with no S1 folder, from the S2
    patches' `<s2>_labels_metadata.json` (then only "s2" can be read).
    `split`: a name, names, or "all" (None) for every patch found. Split lists are `split_files={split: path}` or
    `train.csv`/`val.csv`/`test.csv` (also `.csv.bz2`, as `bigearthnet-common` ships them) in `root`: S2 names,
    one per line, or `s2,s1` pairs. `drop_snow_cloud` removes the S2 patches listed in
    `patches_with_seasonal_snow.csv` and `patches_with_cloud_and_shadow.csv` (or .bz2) found in `root`.

    Every band file of a sample must have the CRS and footprint of the sample's first band file (S1 and S2 alike);
    pixels at a band's declared nodata value are NaN (0 once normalized). Problems raise `BigEarthNetDataError` /
    `DataFileError` naming the patch and file, or with `on_error="skip"` are skipped and counted in `skipped`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str] | None = None,
        modalities: Sequence[str] = ("s1", "s2"),
        bands: Mapping[str, Sequence[str]] | None = None,
        normalize: bool = True,
        stats: Mapping[str, Mapping[str, tuple[float, float]] | str] | None = None,
        on_error: str = "raise",
        drop_snow_cloud: bool = False,
        split_files: Mapping[str, str | os.PathLike] | None = None,
        s1_root: str | os.PathLike | None = None,
        s2_root: str | os.PathLike | None = None,
    ):
        self.root = Path(root)
        super().__init__(modalities, bands, normalize, stats, on_error)
        if not self.root.is_dir():
            raise FileNotFoundError(f"BigEarthNet v1 root not found: {self.root}")
        self.splits = None if selects_all(split) else resolve_splits(split, self.root)  # before the slow indexing
        folders = {}
        for kind, given in (("s1", s1_root), ("s2", s2_root)):
            if given is not None:
                if not Path(given).is_dir():
                    raise FileNotFoundError(f"{kind}_root not found: {given}")
                folders[kind] = Path(given)
        if len(folders) < 2:
            folders.update(find_patch_folders(self.root, [kind for kind in ("s1", "s2") if kind not in folders]))
        self.s1_dir, self.s2_dir = folders.get("s1"), folders.get("s2")
        for kind, folder in (("s1", self.s1_dir), ("s2", self.s2_dir)):
            if kind in self.modalities and folder is None:
                raise FileNotFoundError(f"no Sentinel-{kind[1]} patch folders under {self.root} (folders of "
                                        f"<name>/<name>_<band>.tif); pass {kind}_root")
        if self.s1_dir is None and self.s2_dir is None:
            raise FileNotFoundError(f"no BigEarthNet v1 patch folders under {self.root}")
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
                self._drop_row(labels)
                continue
            ids.append(s2_name)
            s1_names.append(s1_name)
            split_names.append(split_name)
            label_rows.append(labels_to_multi_hot(labels, s2_name))
        self.ids = ids
        self.s1_names = s1_names
        self.labels = np.stack(label_rows) if label_rows else self.labels
        self.split_of = dict(zip(ids, split_names))
        self.metadata = pd.DataFrame({"patch_id": ids, "s1_name": s1_names, "split": split_names})
        self._require_samples(split if self.splits is not None else ALL, f"the BigEarthNet v1 archive at {self.root}")
        self.track_skipped(self._rows_dropped)

    def _index_patches(self) -> dict[str, tuple[str | None, list[str] | BigEarthNetDataError]]:
        pairs: dict[str, tuple[str | None, list[str] | BigEarthNetDataError]] = {}
        patch_root = self.s1_dir if self.s1_dir is not None else self.s2_dir
        for folder in sorted(p for p in patch_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            path = folder / f"{folder.name}_labels_metadata.json"
            try:
                meta = self._read_json(path)
                if self.s1_dir is None:
                    s2_name, s1_name = folder.name, None
                else:
                    s2_name, s1_name = meta.get("corresponding_s2_patch"), folder.name
                    if not isinstance(s2_name, str) or not s2_name:
                        raise BigEarthNetDataError(f"patch {folder.name}: {path} has no 'corresponding_s2_patch'")
                    if s2_name in pairs:
                        raise BigEarthNetDataError(f"patch {s2_name}: paired with two S1 patches, {pairs[s2_name][0]} "
                                                   f"and {folder.name}")
            except BigEarthNetDataError as error:
                self._drop_row(error)
                continue
            pairs[s2_name] = (s1_name, self._mapped_labels(meta, s2_name, path))
        return pairs

    @staticmethod
    def _read_json(path: Path) -> dict:
        if not path.is_file():
            raise BigEarthNetDataError(f"patch {path.parent.name}: labels metadata missing: {path}")
        try:
            with open(path) as handle:
                meta = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BigEarthNetDataError(f"patch {path.parent.name}: {path} is not valid JSON ({error})") from None
        if not isinstance(meta, dict):
            raise BigEarthNetDataError(f"patch {path.parent.name}: {path} holds no JSON object")
        return meta

    @staticmethod
    def _mapped_labels(meta: dict, s2_name: str, path: Path) -> list[str] | BigEarthNetDataError:
        where = f"patch {s2_name} ({path})"
        if "labels" not in meta:
            return BigEarthNetDataError(f"{where}: labels metadata has no 'labels'")
        try:
            return corine_43_to_19(label_list(meta["labels"], where), where)
        except BigEarthNetDataError as error:
            return error

    def _select_patches(self, pairs, split_files) -> list[tuple[str, str | None]]:
        files = find_split_files(self.root, split_files)
        if self.splits is None:
            # every patch found; its split is known when a split list names it
            split_of = {}
            for name, path in files.items():
                for row in read_split_rows(path):
                    split_of.setdefault(row[0], name)
            return [(s2, split_of.get(s2)) for s2 in pairs]
        selected = []
        for name in self.splits:
            if name not in files:
                raise missing_split_list_error(name, self.root)
            path = files[name]
            rows = read_split_rows(path)
            for row in rows:
                s2_name = row[0]
                if s2_name not in pairs:
                    absent = sum(r[0] not in pairs for r in rows)
                    raise BigEarthNetDataError(
                        f"patch {s2_name} (listed in {path}) has no labels metadata under {self.root} ({absent} of "
                        f"its {len(rows)} patches are absent; for a subset of BigEarthNet use split 'all': each "
                        f"patch's split is still read from the lists)"
                    )
                if len(row) > 1 and pairs[s2_name][0] is not None and row[1] != pairs[s2_name][0]:
                    raise BigEarthNetDataError(
                        f"patch {s2_name}: {path} pairs it with {row[1]}, the S1 metadata with {pairs[s2_name][0]}"
                    )
                selected.append((s2_name, name))
        return selected

    def _snow_cloud_patches(self) -> set[str]:
        paths = [path for path in (find_list_file(self.root, name) for name in SNOW_CLOUD_LISTS) if path]
        if not paths:
            warnings.warn(f"drop_snow_cloud=True but none of {list(SNOW_CLOUD_LISTS)} is in {self.root}", stacklevel=3)
        return {row[0] for path in paths for row in read_split_rows(path)}

    def _band_path(self, index: int, modality: str, band: str) -> Path:
        if modality == "s2":
            name = self.ids[index]
            return self.s2_dir / name / f"{name}_{band}.tif"
        name = self.s1_names[index]
        if name is None:
            raise BigEarthNetDataError(f"patch {self.ids[index]}: no Sentinel-1 patch is paired with it")
        return self.s1_dir / name / f"{name}_{band}.tif"

    def _read_sample_bands(self, index: int) -> dict[str, tuple[dict[str, np.ndarray], dict[str, float]]]:
        reference: list[RasterInfo] = []  # the sample's first band file: every other must share its grid
        return {m: self._read_band_files(index, m, reference) for m in self.modalities}

    def read_bands_and_nodata(self, index: int, modality: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        return self._read_band_files(index, modality, [])

    def _read_band_files(self, index: int, modality: str, reference: list[RasterInfo]):
        arrays, nodata = {}, {}
        patch = self.ids[index]
        for band in self.bands[modality]:
            path = self._band_path(index, modality, band)
            if not path.is_file():
                raise DataFileError(f"patch {patch}: band file missing: {path}")
            try:
                array, info = read_raster(path, [1])
                if reference:
                    check_same_grid(info, reference[0], allow_resample=True)
                else:
                    reference.append(info)
            except DataFileError as error:
                raise DataFileError(f"patch {patch}: {error}") from None
            arrays[band] = array[0]
            if info.nodata is not None:
                nodata[band] = float(info.nodata)
            # the generic shape error would name the band; name the file instead, that is what the user must fix
            native = native_size_px(band)
            if arrays[band].shape not in {(native, native), (PATCH_SIZE_PX, PATCH_SIZE_PX)}:
                raise DataFileError(f"patch {patch}: {path} has size {arrays[band].shape}, expected "
                                    f"({native}, {native})")
        return arrays, nodata
