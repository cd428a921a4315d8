"""SEN12MS (Schmitt et al. 2019) triplets: Sentinel-1 / Sentinel-2 / MODIS land cover, scene classification.

Layout (as distributed)::

    root/ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif   (2 bands: VV, VH in dB, float32)
    root/ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.tif   (13 bands: B01..B12 with B8A and B10, uint16)
    root/ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p30.tif   (4 bands: IGBP, LCCS_LC, LCCS_LU, LCCS_SH)

Sample id: `ROIs1158_spring_1_p30`. The scene label is the majority class of the land-cover raster's IGBP band
mapped to the simplified IGBP scheme (10 classes, the DFC2020 mapping `IGBP2DFC` of the SEN12MS toolbox), ties
going to the lower class index. IGBP values outside 1..17 are an error naming the lc file.

Splits: `split_files={split: path}` or `train.txt`/`val.txt`/`test.txt` (or .csv) in root, listing sample ids or
any of the triplet's file names (the official pickled lists are never unpickled: convert them to text).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mmfuse_fast.errors import ConfigError

from .geotiff import DataFileError, RasterDataset, check_same_grid, nan_nodata, read_raster, select_split

SEN12MS_S1_BANDS = ("VV", "VH")
SEN12MS_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
SEN12MS_CLASSES = ("Forest", "Shrubland", "Savanna", "Grassland", "Wetlands", "Croplands", "Urban/Built-up",
                   "Snow/Ice", "Barren", "Water")
# IGBP (1..17) -> simplified IGBP (1..10); index 0 unused (SEN12MS toolbox / DFC2020).
IGBP2DFC = np.array([0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10])
SEASONS = ("spring", "summer", "fall", "winter")
_S2_FILE = re.compile(r"^(ROIs\d+_[a-z]+)_s2_(\d+)_p(\d+)\.tif$")


def sample_id_of(name: str) -> str:
    """Sample id from an id or any triplet file name: ROIs1158_spring_s2_1_p30.tif -> ROIs1158_spring_1_p30."""
    name = Path(name).name
    if name.endswith(".tif"):
        name = name[:-4]
    return re.sub(r"_(s1|s2|lc)_(\d+)_p", r"_\2_p", name)


def simplified_igbp(igbp: np.ndarray, path) -> np.ndarray:
    """IGBP codes -> simplified classes 0..9; values outside 1..17 raise naming `path`."""
    codes = np.asarray(igbp)
    if codes.dtype.kind == "f":
        codes = codes.astype(np.int64)
    bad = (codes < 1) | (codes > 17)
    if bad.any():
        raise DataFileError(f"{path}: IGBP label values {sorted(np.unique(codes[bad]).tolist())[:8]} out of range "
                            f"[1, 17]")
    return IGBP2DFC[codes.astype(np.int64)] - 1


class SEN12MS(RasterDataset):
    """SEN12MS scene classification: `ds[i]` -> {"s1": (2,256,256), "s2": (13,256,256), "label": int64 (),
    "id": str}. `bands` selects/reorders by name; `stats` {m: {band: (mean, std)} or CSV path} (default: computed
    from up to 32 patches spread over everything found under root, so every split normalizes alike)."""

    task = "scene"

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str] | None = None,
                 modalities: Sequence[str] = ("s1", "s2"), bands: Mapping[str, Sequence[str]] | None = None,
                 normalize: bool = True, stats: Mapping[str, Mapping[str, tuple[float, float]] | str] | None = None,
                 on_error: str = "raise", seasons: Sequence[str] | None = None,
                 split_files: Mapping[str, str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SEN12MS root not found: {self.root}")
        self.available_bands = {"s1": SEN12MS_S1_BANDS, "s2": SEN12MS_S2_BANDS}
        self.num_classes, self.classes, self.ignore_index = len(SEN12MS_CLASSES), SEN12MS_CLASSES, -100
        seasons = tuple(seasons or SEASONS)
        for s in seasons:
            if s not in SEASONS:
                raise ConfigError(f"unknown season {s!r}; valid: {list(SEASONS)}")
        self._paths: dict[str, Path] = {}  # id -> s2 path
        for season_dir in sorted(self.root.glob("ROIs*_*")):
            if not season_dir.is_dir() or season_dir.name.split("_")[-1] not in seasons:
                continue
            for s2 in sorted(season_dir.glob("s2_*/*.tif")):
                if _S2_FILE.match(s2.name):
                    self._paths[sample_id_of(s2.name)] = s2
        if not self._paths:
            raise FileNotFoundError(f"no SEN12MS patches under {self.root} (expected "
                                    f"ROIs*_<season>/s2_<scene>/ROIs*_<season>_s2_<scene>_p<patch>.tif)")
        self.ids, self.split_of = select_split(list(self._paths), self.root, split, split_files, key=sample_id_of)
        self._setup(modalities, bands, normalize, stats, on_error)
        self.fill_missing_stats(list(self._paths))

    def triplet_paths(self, index: int) -> dict[str, Path]:
        s2 = self._paths[self.ids[index]]
        scene_dir = s2.parent.name.split("_", 1)[1]
        out = {"s2": s2}
        for kind in ("s1", "lc"):
            out[kind] = s2.parent.parent / f"{kind}_{scene_dir}" / s2.name.replace("_s2_", f"_{kind}_")
        return out

    def land_cover(self, index: int) -> np.ndarray:
        """The simplified IGBP class map (H, W), classes 0..9."""
        path = self.triplet_paths(index)["lc"]
        lc, _ = read_raster(path, [1])
        return simplified_igbp(lc[0], path)

    def read_raw(self, index: int) -> dict:
        paths = self.triplet_paths(index)
        lc, lc_info = read_raster(paths["lc"], [1])
        out = {}
        for m in self.modalities:
            indexes = [self.available_bands[m].index(b) + 1 for b in self.bands[m]]
            array, info = read_raster(paths[m], indexes)
            if info.count != len(self.available_bands[m]):
                raise DataFileError(f"{paths[m]}: has {info.count} bands, SEN12MS {m} has "
                                    f"{len(self.available_bands[m])}")
            check_same_grid(info, lc_info, allow_resample=False)
            out[m] = nan_nodata(array, info.nodata)
        classes = simplified_igbp(lc[0], paths["lc"])
        out["label"] = np.int64(np.bincount(classes.ravel(), minlength=self.num_classes).argmax())
        return out
