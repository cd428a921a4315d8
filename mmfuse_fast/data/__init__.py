"""The readers (one base, one constructor vocabulary: `mmfuse_fast.data.base`), band specs, splits, packing.

`build_dataset(data_cfg, splits, bands)` builds the reader `data.dataset` names. Its constructor receives `root`
(data.root), `split` (data.splits), `modalities` and `bands` (the model's modalities: a modality given no band
names gets every band the data declares), `on_error`, the reader keys of the data config (drop_snow_cloud,
seasons, modality_dirs, label_dir, num_classes, ignore_index, reduce_zero_label, stats_files) and, as they are,
the entries of `data.options`, which name constructor arguments of the reader and override those keys.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from mmfuse_fast.errors import ConfigError

from .bands import BAND_RESOLUTION_M, BAND_STATS, MODALITY_BANDS, S1_BANDS, S2_BANDS, compute_band_stats
from .base import BandDataset, SkipBadSamples, read_stats_csv, skipped_count
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
from .pack import MANIFEST, PackedDataset, PackError, pack_dataset, verify_pack
from .seg_tiles import SegmentationTiles
from .sen12ms import SEN12MS, SEN12MS_CLASSES, SEN12MS_S1_BANDS, SEN12MS_S2_BANDS
from .splits import ALL, SPLITS, read_split_list, selects_all

DATASETS = {"bigearthnet_v2": BigEarthNetV2, "bigearthnet_v1": BigEarthNetV1, "sen12ms": SEN12MS,
            "seg_tiles": SegmentationTiles, "packed": PackedDataset}

# constructor arguments build_dataset fills from other config keys; data.options may not set them
_FROM_OTHER_KEYS = {"root": "data.root", "split": "data.splits", "modalities": "model.modalities",
                    "bands": "model.modalities"}


def reader_options(dataset: str) -> tuple[str, ...]:
    """The constructor arguments `data.options` may set for the reader named `dataset`."""
    if dataset not in DATASETS:
        raise ConfigError(f"config key 'data.dataset': unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    return tuple(name for name in inspect.signature(DATASETS[dataset]).parameters if name not in _FROM_OTHER_KEYS)


def check_reader_options(dataset: str, options: Mapping) -> None:
    """A ConfigError naming the first key of `options` the reader `dataset` has no argument for."""
    accepted = reader_options(dataset)
    for key in options:
        if key in _FROM_OTHER_KEYS:
            raise ConfigError(f"config key 'data.options.{key}': set by {_FROM_OTHER_KEYS[key]}, not by an option")
        if key not in accepted:
            raise ConfigError(f"config key 'data.options.{key}': reader {dataset} has no option {key!r}; its "
                              f"options: {', '.join(accepted)}")


def _reader_kwargs(data_cfg, bands: Mapping[str, Sequence[str]]) -> dict:
    """Constructor arguments from the data config's named reader keys, then `data.options` as they are."""
    kwargs = {"modalities": tuple(bands), "bands": {m: list(b or ()) for m, b in bands.items()},
              "on_error": data_cfg.on_error}
    stats = {m: path for m, path in data_cfg.stats_files.items() if m in bands}
    if stats:
        kwargs["stats"] = stats
    if data_cfg.dataset in ("bigearthnet_v1", "bigearthnet_v2"):
        kwargs["drop_snow_cloud"] = data_cfg.drop_snow_cloud
    elif data_cfg.dataset == "sen12ms":
        kwargs["seasons"] = data_cfg.seasons or None
    elif data_cfg.dataset == "seg_tiles":
        dirs = dict(data_cfg.modality_dirs)
        kwargs.update(modalities={m: dirs.get(m, m) for m in bands}, label_dir=data_cfg.label_dir,
                      num_classes=data_cfg.num_classes or None, ignore_index=data_cfg.ignore_index,
                      reduce_zero_label=data_cfg.reduce_zero_label)
    options = dict(getattr(data_cfg, "options", None) or {})
    check_reader_options(data_cfg.dataset, options)
    return {**kwargs, **options}


def build_dataset(data_cfg, splits: Sequence[str], bands: Mapping[str, Sequence[str]]):
    """The dataset named by `data_cfg.dataset` (a `mmfuse_fast.config.DataConfig`) for `splits` (["all"]: every
    sample), with the modalities and band order of `bands` ({modality: [band names]}, the model config's
    `modalities`; an empty list: every band the data declares, which the dataset's `bands` then lists)."""
    reader_options(data_cfg.dataset)  # an unknown dataset named before anything is read
    root = data_cfg.root
    if not root:
        if data_cfg.dataset != "bigearthnet_v2":
            raise ConfigError(f"config key 'data.root' is empty: dataset {data_cfg.dataset!r} needs a root folder")
        root = fetch_bigearthnet_v2_sample()
    return DATASETS[data_cfg.dataset](root, split=list(splits), **_reader_kwargs(data_cfg, bands))


def _packed_bands(root: Path) -> Mapping[str, Sequence[str]]:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"not a finished pack: {manifest_path} missing")
    manifest = json.loads(manifest_path.read_text())
    return MODALITY_BANDS if manifest.get("format") == "bigearthnet_v1" else manifest["bands"]


def _file_bands(data_cfg, modalities: Sequence[str]) -> Mapping[str, Sequence[str]]:
    """The bands the files of a seg_tiles or packed dataset declare."""
    if data_cfg.dataset == "seg_tiles":
        options = dict(getattr(data_cfg, "options", None) or {})
        dirs = dict(data_cfg.modality_dirs)
        return SegmentationTiles.declared_bands(data_cfg.root, {m: dirs.get(m, m) for m in modalities},
                                                options.get("label_dir", data_cfg.label_dir),
                                                options.get("band_names"))
    if data_cfg.dataset == "packed":
        return _packed_bands(Path(data_cfg.root))
    reader_options(data_cfg.dataset)  # an unknown dataset: the error naming data.dataset
    raise AssertionError(f"no band source for dataset {data_cfg.dataset!r}")


def format_bands(dataset: str) -> dict[str, tuple[str, ...]] | None:
    """{modality: band names} of a dataset whose format fixes its bands; None where its files declare them."""
    if dataset in ("bigearthnet_v1", "bigearthnet_v2"):
        return dict(MODALITY_BANDS)
    if dataset == "sen12ms":
        return {"s1": SEN12MS_S1_BANDS, "s2": SEN12MS_S2_BANDS}
    return None


def declared_bands(data_cfg, modalities: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """{modality: band names} the data of `data_cfg` declares for each of `modalities`, in the data's order: what
    an empty band list in `model.modalities` stands for. Reads at most one file per modality."""
    known = format_bands(data_cfg.dataset) or _file_bands(data_cfg, modalities)
    missing = [m for m in modalities if m not in known]
    if missing:
        raise ConfigError(f"config key 'model.modalities' names {missing}, which data.dataset={data_cfg.dataset} "
                          f"does not have (it has {sorted(known)})")
    return {m: tuple(known[m]) for m in modalities}


__all__ = [
    "ALL",
    "BAND_RESOLUTION_M",
    "BAND_STATS",
    "BIGEARTHNET_CLASSES",
    "CORINE_43_CLASSES",
    "CORINE_43_TO_19",
    "DATASETS",
    "MODALITY_BANDS",
    "S1_BANDS",
    "S2_BANDS",
    "SPLITS",
    "BandDataset",
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
    "SkipBadSamples",
    "build_dataset",
    "check_reader_options",
    "compute_band_stats",
    "declared_bands",
    "format_bands",
    "fetch_bigearthnet_v2_sample",
    "pack_dataset",
    "read_split_list",
    "read_stats_csv",
    "reader_options",
    "selects_all",
    "skipped_count",
    "verify_pack",
]
