"""Band specs and normalization, BigEarthNet readers, sample fetching."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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

DATASETS = {"bigearthnet_v2": BigEarthNetV2, "bigearthnet_v1": BigEarthNetV1}


def build_dataset(data_cfg, splits: Sequence[str], bands: Mapping[str, Sequence[str]]):
    """The dataset named by `data_cfg.dataset` (a `mmfuse_fast.config.DataConfig`) for `splits`, with the
    modalities and band order of `bands` ({modality: [band names]}, the model config's `modalities`)."""
    if data_cfg.dataset not in DATASETS:
        raise ValueError(f"config key 'data.dataset': unknown dataset {data_cfg.dataset!r}; known: {sorted(DATASETS)}")
    root = data_cfg.root
    if not root:
        if data_cfg.dataset != "bigearthnet_v2":
            raise ValueError(f"config key 'data.root' is empty: dataset {data_cfg.dataset!r} needs a root folder")
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
    "build_dataset",
    "compute_band_stats",
    "fetch_bigearthnet_v2_sample",
]
