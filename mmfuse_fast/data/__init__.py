"""Band specs and normalization, BigEarthNet readers, sample fetching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmfuse_fast.errors import ConfigError

from .bands import BAND_RESOLUTION_M, BAND_STATS, MODALITY_BANDS, compute_band_stats
from .bigearthnet import (
    BIGEARTHNET_CLASSES,
    CORINE_43_CLASSES,
    CORINE_43_TO_19,
    BigEarthNetDataError,
    BigEarthNetV1,
    BigEarthNetV2,
)
from .fetch import fetch_bigearthnet_v2_sample
from .geotiff import DataFileError, RasterDataset
from .pack import PackedDataset, PackError, pack_dataset, verify_pack
from .seg_tiles import SegmentationTiles
from .sen12ms import SEN12MS, SEN12MS_CLASSES

DATASETS = {"bigearthnet_v2": BigEarthNetV2, "bigearthnet_v1": BigEarthNetV1, "sen12ms": SEN12MS,
            "seg_tiles": SegmentationTiles, "packed": PackedDataset}


def _raster_kwargs(data_cfg, bands):
    stats = {m: path for m, path in getattr(data_cfg, "stats_files", {}).items() if m in bands}
    kwargs = {"bands": {m: list(b) for m, b in bands.items()}, "on_error": data_cfg.on_error}
    if data_cfg.dataset == "sen12ms":
        kwargs.update(modalities=tuple(bands), seasons=data_cfg.seasons or None)
        if stats:
            from .geotiff import read_stats_csv
            from .sen12ms import SEN12MS_S1_BANDS, SEN12MS_S2_BANDS

            names = {"s1": SEN12MS_S1_BANDS, "s2": SEN12MS_S2_BANDS}
            kwargs["stats"] = {m: read_stats_csv(p, names[m]) for m, p in stats.items()}
    elif data_cfg.dataset == "seg_tiles":
        dirs = dict(data_cfg.modality_dirs)
        kwargs.update(modalities={m: dirs.get(m, m) for m in bands}, label_dir=data_cfg.label_dir,
                      num_classes=data_cfg.num_classes or None, ignore_index=data_cfg.ignore_index,
                      reduce_zero_label=data_cfg.reduce_zero_label, stats=stats or None)
    else:  # packed
        kwargs.update(modalities=tuple(bands))
    return kwargs


def build_dataset(data_cfg, splits: Sequence[str], bands: Mapping[str, Sequence[str]]):
    """The dataset named by `data_cfg.dataset` (a `mmfuse_fast.config.DataConfig`) for `splits`, with the
    modalities and band order of `bands` ({modality: [band names]}, the model config's `modalities`)."""
    if data_cfg.dataset not in DATASETS:
        raise ConfigError(f"config key 'data.dataset': unknown dataset {data_cfg.dataset!r}; known: {sorted(DATASETS)}")
    root = data_cfg.root
    if data_cfg.dataset in ("sen12ms", "seg_tiles", "packed"):
        if not root:
            raise ConfigError(f"config key 'data.root' is empty: dataset {data_cfg.dataset!r} needs a root folder")
        return DATASETS[data_cfg.dataset](root, split=list(splits), **_raster_kwargs(data_cfg, bands))
    if not root:
        if data_cfg.dataset != "bigearthnet_v2":
            raise ConfigError(f"config key 'data.root' is empty: dataset {data_cfg.dataset!r} needs a root folder")
        root = fetch_bigearthnet_v2_sample()
    return DATASETS[data_cfg.dataset](
        root,
        split=list(splits),
        modalities=tuple(bands),
        bands={modality: list(names) for modality, names in bands.items()},
        drop_snow_cloud=data_cfg.drop_snow_cloud,
        on_error=data_cfg.on_error,
    )


__all__ = [
    "BAND_RESOLUTION_M",
    "BAND_STATS",
    "BIGEARTHNET_CLASSES",
    "CORINE_43_CLASSES",
    "CORINE_43_TO_19",
    "DATASETS",
    "MODALITY_BANDS",
    "BigEarthNetDataError",
    "BigEarthNetV1",
    "BigEarthNetV2",
    "DataFileError",
    "PackError",
    "PackedDataset",
    "RasterDataset",
    "SEN12MS",
    "SEN12MS_CLASSES",
    "SegmentationTiles",
    "build_dataset",
    "pack_dataset",
    "verify_pack",
    "compute_band_stats",
    "fetch_bigearthnet_v2_sample",
]
