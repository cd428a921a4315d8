"""Shared GeoTIFF reading and the base class of the raster datasets (SEN12MS, segmentation tiles, packed).

Every reader here returns, per sample, `{modality: float32 (C, H, W), "label": ..., "id": str}` with bands addressed
by name. Errors about a file (missing, corrupt, wrong CRS or size, labels out of range) raise `DataFileError`,
whose message names the file. Nodata pixels of an image are NaN in the raw arrays; after normalization they are 0
(the band mean); a pixel with nodata in every band of a modality gets the ignore index in the label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmfuse_fast.errors import DataError, DataFileError

from .base import BandDataset, read_stats_csv, resolve_stats
from .splits import SPLIT_FILE_NAMES, find_split_files, read_split_list, select_split

__all__ = ["DataFileError", "RasterInfo", "read_raster", "raster_info", "resample", "check_same_grid",
           "RasterDataset", "default_band_names", "read_stats_csv", "nan_nodata", "select_split", "read_split_list",
           "SPLIT_FILE_NAMES", "find_split_files"]


@dataclass
class RasterInfo:
    path: str
    crs: object
    transform: object
    nodata: float | None
    height: int
    width: int
    count: int
    dtype: str
    descriptions: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        x0, y0 = t.c, t.f
        x1, y1 = t.c + t.a * self.width + t.b * self.height, t.f + t.d * self.width + t.e * self.height
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _open(path: Path):
    import rasterio
    from rasterio.errors import RasterioError

    if not path.is_file():
        raise DataFileError(f"file missing: {path}")
    try:
        return rasterio.open(path)
    except RasterioError as error:
        raise DataFileError(f"corrupt or unreadable GeoTIFF {path} ({error})") from None


def _info(source, path: Path) -> RasterInfo:
    return RasterInfo(str(path), source.crs, source.transform, source.nodata, source.height, source.width,
                      source.count, source.dtypes[0], tuple(source.descriptions))


def raster_info(path: str | os.PathLike) -> RasterInfo:
    path = Path(path)
    with _open(path) as source:
        return _info(source, path)


def read_raster(path: str | os.PathLike, indexes: Sequence[int] | None = None) -> tuple[np.ndarray, RasterInfo]:
    """(array (C, H, W) in the file's dtype, info). `indexes`: 1-based band numbers (default: all)."""
    from rasterio.errors import RasterioError

    path = Path(path)
    with _open(path) as source:
        info = _info(source, path)
        if indexes is not None:
            bad = [i for i in indexes if not 1 <= i <= source.count]
            if bad:
                raise DataFileError(f"{path}: has {source.count} bands, band numbers {bad} requested")
        try:
            array = source.read(list(indexes) if indexes is not None else None)
        except RasterioError as error:
            raise DataFileError(f"corrupt or unreadable GeoTIFF {path} ({error})") from None
    return array, info


def default_band_names(info: RasterInfo) -> tuple[str, ...]:
    """The file's band descriptions when every band has a distinct one, else B1..Bn."""
    names = tuple(info.descriptions)
    if all(names) and len(set(names)) == len(names):
        return names
    return tuple(f"B{i + 1}" for i in range(info.count))


def check_same_grid(info: RasterInfo, reference: RasterInfo, allow_resample: bool) -> None:
    """Same CRS; same size (or, with `allow_resample`, the same footprint at another resolution)."""
    if info.crs != reference.crs:
        raise DataFileError(f"{info.path}: CRS {info.crs} differs from {reference.crs} of {reference.path}")
    if info.shape == reference.shape and not allow_resample:
        return
    if not allow_resample and info.shape != reference.shape:
        raise DataFileError(f"{info.path}: size {info.shape} differs from {reference.shape} of {reference.path}")
    if reference.transform is None or info.transform is None:
        return
    tol = max(abs(reference.transform.a), abs(info.transform.a), 1e-9) * 0.5 + 1e-6
    if any(abs(a - b) > tol for a, b in zip(info.bounds, reference.bounds)):
        raise DataFileError(f"{info.path}: footprint {tuple(round(v, 3) for v in info.bounds)} differs from "
                            f"{tuple(round(v, 3) for v in reference.bounds)} of {reference.path} (size "
                            f"{info.shape} vs {reference.shape})")


def resample(array: np.ndarray, shape: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(C, H, W) -> (C, *shape). bilinear (align_corners=False, NaN-aware: a NaN spreads to its neighbours) or
    nearest."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if mode == "nearest":
        return F.interpolate(x, size=shape, mode="nearest")[0].numpy()
    return F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=False)[0].numpy()


class RasterDataset(BandDataset):
    """Base of the GeoTIFF/packed readers: band selection by name, normalization, nodata, skip-on-error.

    Subclasses set `ids`, `split_of`, `available_bands` ({m: all band names in file order}), `task` ("scene" |
    "segmentation"), `num_classes`, `classes`, `ignore_index`, and implement `read_raw(index) -> {m: float32
    (C, H, W) with NaN at nodata, "label": int64 () or (H, W)}` for the selected bands `self.bands`. `stats`:
    {m: {band: (mean, std)} or CSV path}; bands without statistics get them computed from up to `STATS_SAMPLES`
    samples spread over the dataset (`compute_stats`), except those of a modality given a CSV, which must cover
    them.
    """

    STATS_SAMPLES = 32
    task = "scene"
    _all_bad_error = DataFileError

    def _setup(self, modalities, bands, normalize, stats, on_error):
        self.select_bands(modalities, self.available_bands, bands, normalize, on_error)
        given = resolve_stats(stats, self.available_bands, self.bands)
        self.stats = {m: dict(given.get(m, {})) for m in self.modalities}
        self._mean_std = None
        self.track_skipped()

    # -- normalization -------------------------------------------------------------------------------------------

    def _ensure_stats(self) -> None:
        missing = {m: [b for b in self.bands[m] if b not in self.stats[m]] for m in self.modalities}
        if any(missing.values()):
            computed = self.compute_stats()
            for m, names in missing.items():
                for b in names:
                    self.stats[m][b] = computed[m][b]
        self.set_mean_std(self.stats, constant_ok=True)

    def normalization_stats(self) -> dict[str, dict[str, tuple[float, float]]] | None:
        """{modality: {band: (mean, std)}} the samples are normalized with (computed now if missing); None
        with normalize off."""
        if not self.normalize:
            return None
        if self._mean_std is None:
            self._ensure_stats()
        return {m: {b: tuple(self.stats[m][b]) for b in self.bands[m]} for m in self.modalities}

    def compute_stats(self, max_samples: int | None = None) -> dict[str, dict[str, tuple[float, float]]]:
        """Per-band (mean, std) over the valid (non-nodata) pixels of up to `max_samples` evenly spread samples."""
        n = len(self)
        if n == 0:
            raise DataError(f"cannot compute band statistics: no sample selected in the dataset at "
                            f"{getattr(self, 'root', '?')}")
        k = min(n, max_samples or self.STATS_SAMPLES)
        picks = sorted({int(i) for i in np.linspace(0, n - 1, k)})
        sums = {m: np.zeros((len(self.bands[m]), 3)) for m in self.modalities}
        for i in picks:
            raw = self.read_raw(i)
            for m in self.modalities:
                x = raw[m].reshape(len(self.bands[m]), -1).astype(np.float64)
                valid = np.isfinite(x)
                xv = np.where(valid, x, 0.0)
                sums[m][:, 0] += valid.sum(1)
                sums[m][:, 1] += xv.sum(1)
                sums[m][:, 2] += (xv * xv).sum(1)
        out = {}
        for m in self.modalities:
            cnt = np.maximum(sums[m][:, 0], 1)
            mean = sums[m][:, 1] / cnt
            std = np.sqrt(np.maximum(sums[m][:, 2] / cnt - mean * mean, 0))
            out[m] = {b: (float(mu), float(sd)) for b, mu, sd in zip(self.bands[m], mean, std)}
        return out

    def fill_missing_stats(self, stats_ids: Sequence[str]) -> None:
        """With normalize on, computes the statistics of the bands that have none over the samples `stats_ids`
        (every sample found, not just this split, so all splits are normalized alike)."""
        if not self.normalize or all(b in self.stats[m] for m in self.modalities for b in self.bands[m]):
            return
        selected = self.ids
        self.ids = list(stats_ids)
        try:
            computed = self.compute_stats()
        finally:
            self.ids = selected
        for m in self.modalities:
            for b in self.bands[m]:
                self.stats[m].setdefault(b, computed[m][b])

    # -- samples ---------------------------------------------------------------------------------------------------

    def read_raw(self, index: int) -> dict:
        raise NotImplementedError

    def _load_sample(self, index: int) -> dict:
        raw = self.read_raw(index)
        return self.finish(raw, self.ids[index])

    def finish(self, raw: dict, sample_id: str) -> dict:
        """Raw arrays -> the sample: float32 tensors, normalized (NaN/nodata -> 0), label as int64."""
        if self.normalize and self._mean_std is None:
            self._ensure_stats()
        sample = {}
        for m in self.modalities:
            x = np.array(raw[m], dtype=np.float32)  # a copy: normalized in place
            if self.normalize:
                x = np.nan_to_num(self.normalize_in_place(x, m), nan=0.0, posinf=0.0, neginf=0.0, copy=False)
            sample[m] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        sample["label"] = torch.as_tensor(np.asarray(raw["label"]), dtype=torch.int64)
        sample["id"] = sample_id
        return sample

    def check_labels(self, label: np.ndarray, path) -> np.ndarray:
        """Label values must be integers in [0, num_classes) or the ignore index; else an error naming `path`."""
        if label.dtype.kind == "f":
            finite = np.isfinite(label)
            if not finite.all() or not np.all(label[finite] == np.round(label[finite])):
                raise DataFileError(f"{path}: label values must be integers (found non-integer or NaN values)")
        label = label.astype(np.int64)
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            values = sorted(set(np.unique(label[bad]).tolist()))[:8]
            raise DataFileError(f"{path}: label values {values} out of range [0, {self.num_classes}) "
                                f"(ignore index {self.ignore_index})")
        return label


def nan_nodata(array: np.ndarray, nodata: float | None) -> np.ndarray:
    """float32 copy with NaN at the file's nodata value."""
    out = array.astype(np.float32, copy=True)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        out[array == nodata] = np.nan
    return out
