"""Small synthetic datasets in the real folder layouts (GeoTIFFs written with rasterio), for tests, benchmarks and
demos: BigEarthNet v1, SEN12MS and multimodal segmentation tiles. Values are random; layouts, dtypes, band
counts, CRS and transforms are the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bands import S1_BANDS, S2_BANDS, native_size_px

__all__ = ["write_tif", "write_bigearthnet_v1", "write_sen12ms", "write_seg_tiles"]


def write_tif(path, array: np.ndarray, crs="EPSG:32633", transform=None, nodata=None, descriptions=None,
              pixel_size: float = 10.0, origin=(500000.0, 5000000.0)) -> Path:
    """Writes (C, H, W) or (H, W) `array` as a GeoTIFF."""
    import rasterio
    from affine import Affine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 2:
        array = array[None]
    c, h, w = array.shape
    if transform is None:
        transform = Affine(pixel_size, 0, origin[0], 0, -pixel_size, origin[1])
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=array.dtype, crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(array)
        if descriptions:
            for i, d in enumerate(descriptions, 1):
                dst.set_band_description(i, d)
    return path


BEN_43_SAMPLE_LABELS = (
    ["Discontinuous urban fabric", "Non-irrigated arable land"],
    ["Transitional woodland/shrub", "Sea and ocean", "Road and rail networks and associated land"],
    ["Peatbogs", "Natural grassland", "Vineyards"],
    ["Coniferous forest", "Mixed forest"],
    ["Pastures", "Water bodies", "Complex cultivation patterns"],
)


def write_bigearthnet_v1(root, n: int = 4, seed: int = 0, splits=True) -> Path:
    """`n` BigEarthNet v1 patch pairs under root/BigEarthNet-S1-v1.0 and root/BigEarthNet-v1.0 (one .tif per band
    at native resolution, *_labels_metadata.json), plus train/val/test.csv and a snow list when `splits`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        s2_name = f"S2A_MSIL2A_20170613T101031_{i // 50}_{i % 50}"
        s1_name = f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{i // 50}_{i % 50}"
        names.append((s2_name, s1_name))
        labels = BEN_43_SAMPLE_LABELS[i % len(BEN_43_SAMPLE_LABELS)]
        s1_dir, s2_dir = root / "BigEarthNet-S1-v1.0" / s1_name, root / "BigEarthNet-v1.0" / s2_name
        for band in S1_BANDS:
            write_tif(s1_dir / f"{s1_name}_{band}.tif", rng.normal(-15, 4, (120, 120)).astype(np.float32))
        for band in S2_BANDS:
            size = native_size_px(band)
            write_tif(s2_dir / f"{s2_name}_{band}.tif", rng.integers(1, 10000, (size, size)).astype(np.uint16),
                      pixel_size=1200 / size)
        (s1_dir / f"{s1_name}_labels_metadata.json").write_text(
            json.dumps({"labels": labels, "corresponding_s2_patch": s2_name}))
        (s2_dir / f"{s2_name}_labels_metadata.json").write_text(json.dumps({"labels": labels}))
    if splits:
        parts = {"train.csv": names[: max(1, n // 2)], "val.csv": names[n // 2: 3 * n // 4],
                 "test.csv": names[3 * n // 4:]}
        for file_name, rows in parts.items():
            (root / file_name).write_text("".join(f"{s2},{s1}\n" for s2, s1 in rows))
        (root / "patches_with_seasonal_snow.csv").write_text(f"{names[0][0]}\n")
    return root


def write_sen12ms(root, scenes=((1158, "spring", 1), (1868, "summer", 7)), patches_per_scene: int = 2,
                  size: int = 32, seed: int = 0) -> Path:
    """SEN12MS triplets (s1: 2 float32 bands, s2: 13 uint16 bands, lc: 4 uint8 bands with IGBP in band 1) at
    `size` px (256 in the real dataset) under root/ROIs<id>_<season>/{s1,s2,lc}_<scene>/."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for roi, season, scene in scenes:
        folder = root / f"ROIs{roi}_{season}"
        for p in range(patches_per_scene):
            patch = 30 + p
            stem = f"ROIs{roi}_{season}_{{kind}}_{scene}_p{patch}.tif"
            origin = (300000.0 + 2560 * p, 4000000.0)
            write_tif(folder / f"s1_{scene}" / stem.format(kind="s1"),
                      rng.normal(-15, 4, (2, size, size)).astype(np.float32), origin=origin)
            write_tif(folder / f"s2_{scene}" / stem.format(kind="s2"),
                      rng.integers(0, 10000, (13, size, size)).astype(np.uint16), origin=origin)
            lc = np.zeros((4, size, size), np.uint8)
            major = int(rng.integers(1, 18))
            lc[0] = major
            lc[0, : size // 3] = rng.integers(1, 18, (size // 3, size))
            lc[1:] = rng.integers(1, 40, (3, size, size))
            write_tif(folder / f"lc_{scene}" / stem.format(kind="lc"), lc, origin=origin)
    return root


def write_seg_tiles(root, n: int = 4, size: int = 16, modalities=None, num_classes: int = 5, seed: int = 0,
                    nodata_tile: int | None = None, splits: bool = True) -> Path:
    """Segmentation tiles: root/<modality>/tile_<i>.tif for each modality (name -> (bands, scale): a modality at
    scale s has size*s px over the same footprint) and root/labels/tile_<i>.tif (uint8 classes)."""
    root = Path(root)
    modalities = modalities or {"rgb": (3, 1), "dem": (1, 1), "sar": (2, 0.5)}
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        name = f"tile_{i:03d}"
        ids.append(name)
        origin = (400000.0 + i * size * 10.0, 5000000.0)
        label = rng.integers(0, num_classes, (size, size)).astype(np.uint8)
        write_tif(root / "labels" / f"{name}.tif", label, origin=origin)
        for m, (bands, scale) in modalities.items():
            px = int(round(size * scale))
            array = rng.normal(100, 20, (bands, px, px)).astype(np.float32)
            nodata = None
            if nodata_tile == i:
                nodata = -9999.0
                array[:, :2, :2] = nodata
            write_tif(root / m / f"{name}.tif", array, origin=origin, pixel_size=10.0 / scale, nodata=nodata,
                      descriptions=[f"{m}_{b}" for b in range(bands)])
    if splits:
        (root / "train.txt").write_text("".join(f"{i}\n" for i in ids[: max(1, n // 2)]))
        (root / "val.txt").write_text("".join(f"{i}\n" for i in ids[n // 2: 3 * n // 4]))
        (root / "test.txt").write_text("".join(f"{i}\n" for i in ids[3 * n // 4:]))
    return root
