"""Generic multimodal segmentation tiles: one folder per modality plus a label folder, matching file names.

    root/<modality folder>/<name>.tif  (any number of bands; any resolution over the label tile's footprint)
    root/<label folder>/<name>.tif     (one band of integer class ids)

Globe230k-style (rgb/ndvi/dem/sar at one resolution) and C2Seg-style (hsi/msi/sar at different resolutions)
folders both fit: a modality raster whose size differs from its label tile is resampled (bilinear) onto the label
grid after checking that it has the same CRS and footprint. Nodata values (each file's nodata value, NaN) become
NaN in the raw arrays and 0 after normalization; pixels with nodata in every band of a modality get the ignore
index in the label (bad bands filled with nodata, as in EnMAP, do not void a pixel). With `reduce_zero_label`, label 0
(background) is ignored and the other ids shift down by one (the mmsegmentation convention).

Band names come from the first tile's band descriptions when they are complete and distinct, else B1..Bn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mmfuse_fast.errors import ConfigError

from .geotiff import (DataFileError, RasterDataset, check_same_grid, default_band_names, nan_nodata, raster_info,
                      read_raster, resample, select_split)

_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")


class SegmentationTiles(RasterDataset):
    """`ds[i]` -> {modality: float32 (C, H, W) on the label grid, "label": int64 (H, W), "id": str}.

    `modalities`: {modality: folder} or folder names (modality = folder); default: every folder but the label one.
    `num_classes`: default the largest label found + 1 (scanning every label tile once). Label values outside
    [0, num_classes) that are not the ignore index raise an error naming the tile. `stats`: {m: {band: (mean,
    std)}} or {m: csv path}; default: computed from up to 32 tiles spread over everything found under root.
    """

    task = "segmentation"

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str] | None = None,
                 modalities: Mapping[str, str] | Sequence[str] | None = None,
                 bands: Mapping[str, Sequence[str]] | None = None, normalize: bool = True,
                 stats: Mapping[str, Mapping[str, tuple[float, float]] | str] | None = None, on_error: str = "raise",
                 label_dir: str = "labels", num_classes: int | None = None, ignore_index: int = 255,
                 reduce_zero_label: bool = False, class_names: Sequence[str] | None = None,
                 split_files: Mapping[str, str] | None = None, band_names: Mapping[str, Sequence[str]] | None = None):
        self.root = Path(root)
        self.label_dir = self.root / label_dir
        self.folders = tile_folders(self.root, modalities, label_dir)
        self._labels = label_tiles(self.label_dir)
        self.ids, self.split_of = select_split(sorted(self._labels), self.root, split, split_files)
        self.ignore_index, self.reduce_zero_label = int(ignore_index), bool(reduce_zero_label)
        self.available_bands = tile_band_names(self.root, self.folders, min(self._labels), band_names)
        self._band_count = {m: len(b) for m, b in self.available_bands.items()}
        if num_classes is None:
            num_classes = self._scan_num_classes()
        self.num_classes = int(num_classes)
        self.classes = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(self.num_classes))
        self._setup(list(self.folders), bands, normalize, stats, on_error)
        self.fill_missing_stats(sorted(self._labels))

    @staticmethod
    def declared_bands(root: str | os.PathLike, modalities: Mapping[str, str] | Sequence[str] | None = None,
                       label_dir: str = "labels", band_names: Mapping[str, Sequence[str]] | None = None
                       ) -> dict[str, tuple[str, ...]]:
        """{modality: band names} the tiles under `root` declare (the first tile's band descriptions, else
        B1..Bn), read from one file per modality, without building the dataset."""
        root = Path(root)
        folders = tile_folders(root, modalities, label_dir)
        return tile_band_names(root, folders, min(label_tiles(root / label_dir)), band_names)

    def modality_path(self, sample_id: str, modality: str) -> Path:
        return tile_path(self.root / self.folders[modality], sample_id, modality)

    def _scan_num_classes(self) -> int:
        top = 0
        for path in self._labels.values():
            label, info = read_raster(path, [1])
            values = self._map_label(label[0], info, path)
            values = values[values != self.ignore_index]
            if values.size and values.min() < 0:
                raise DataFileError(f"{path}: negative label values {sorted(np.unique(values[values < 0]))[:8]}")
            top = max(top, int(values.max()) + 1 if values.size else 0)
        if top == 0:
            raise DataFileError(f"no labelled pixel in any tile of {self.label_dir}")
        return top

    def _map_label(self, label: np.ndarray, info, path) -> np.ndarray:
        label = np.asarray(label)
        nodata = info.nodata
        invalid = ~np.isfinite(label) if label.dtype.kind == "f" else np.zeros(label.shape, bool)
        if nodata is not None and np.isfinite(nodata):
            invalid |= label == nodata
        if label.dtype.kind == "f":
            finite = label[~invalid]
            if not np.all(finite == np.round(finite)):
                raise DataFileError(f"{path}: label values must be integers (found fractional values)")
            label = np.where(invalid, 0, label)
        label = label.astype(np.int64)
        if self.reduce_zero_label:
            invalid |= label == 0
            label = label - 1
        label[invalid] = self.ignore_index
        return label

    def label_info(self, index: int):
        return raster_info(self._labels[self.ids[index]])

    def read_raw(self, index: int) -> dict:
        sample_id = self.ids[index]
        label_path = self._labels[sample_id]
        label, label_info = read_raster(label_path, [1])
        label = self.check_labels(self._map_label(label[0], label_info, label_path), label_path)
        out, invalid = {}, np.zeros(label.shape, bool)
        for m in self.modalities:
            path = self.modality_path(sample_id, m)
            indexes = [self.available_bands[m].index(b) + 1 for b in self.bands[m]]
            array, info = read_raster(path, indexes)
            if info.count != self._band_count[m]:
                raise DataFileError(f"{path}: has {info.count} bands, the {m} tiles have {self._band_count[m]}")
            check_same_grid(info, label_info, allow_resample=True)
            array = resample(nan_nodata(array, info.nodata), label.shape, "bilinear")
            invalid |= ~np.isfinite(array).any(0)  # nodata in every band (EnMAP fills bad bands)
            out[m] = array
        label[invalid] = self.ignore_index
        out["label"] = label
        return out


def tile_folders(root: Path, modalities: Mapping[str, str] | Sequence[str] | None, label_dir: str) -> dict[str, str]:
    """{modality: folder}: as given (a mapping, or folder names that are also the modality names), or every
    folder holding .tif files but the label folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation tiles root not found: {root}")
    if not (root / label_dir).is_dir():
        raise FileNotFoundError(f"label folder not found: {root / label_dir}")
    if modalities is None:
        modalities = [p.name for p in sorted(root.iterdir()) if p.is_dir() and p.name != label_dir
                      and not p.name.startswith(".") and any(p.glob("*.tif*"))]
    folders = dict(modalities) if isinstance(modalities, Mapping) else {m: m for m in modalities}
    if not folders:
        raise FileNotFoundError(f"no modality folders under {root} besides {label_dir}/")
    for m, folder in folders.items():
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"folder of modality {m!r} not found: {root / folder}")
    return folders


def label_tiles(label_dir: Path) -> dict[str, Path]:
    """{tile name: label file}."""
    tiles = {p.stem: p for p in sorted(label_dir.iterdir()) if p.suffix in _SUFFIXES}
    if not tiles:
        raise FileNotFoundError(f"no label tiles (.tif) in {label_dir}")
    return tiles


def tile_path(folder: Path, sample_id: str, modality: str) -> Path:
    for suffix in _SUFFIXES:
        if (folder / f"{sample_id}{suffix}").is_file():
            return folder / f"{sample_id}{suffix}"
    raise DataFileError(f"tile {sample_id}: {modality} file missing: {folder / (sample_id + '.tif')}")


def tile_band_names(root: Path, folders: Mapping[str, str], first_tile: str,
                    band_names: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """{modality: band names}: `band_names` where given, else those the first tile declares."""
    declared = {}
    for m, folder in folders.items():
        info = raster_info(tile_path(root / folder, first_tile, m))
        names = tuple((band_names or {}).get(m, default_band_names(info)))
        if len(names) != info.count:
            raise ConfigError(f"band_names for {m!r} lists {len(names)} names, {info.path} has {info.count} bands")
        declared[m] = names
    return declared
