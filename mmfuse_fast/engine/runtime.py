"""Device choice, seeding and the config checks that need the registries, shared by the entry points."""

from __future__ import annotations

import dataclasses

import random

import numpy as np
import torch

from mmfuse_fast.errors import ConfigError, DataError

__all__ = ["resolve_device", "seed_everything", "validate_config", "with_declared_bands", "check_inputs"]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device' is {name!r} but CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use train.device=auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validate_config(cfg) -> None:
    """The checks that need the registries or the run's purpose; the dataclasses in config.py check each value's
    type and range themselves when they are built. Raises ConfigError naming the key."""
    from mmfuse_fast.config import require as need
    from mmfuse_fast.data import DATASETS
    from mmfuse_fast.models import MODELS

    model = getattr(cfg, "model", None)
    if model is not None:
        need(model.name in MODELS, "model.name", f"is {model.name!r}; known models: {', '.join(sorted(MODELS))}")
    need(cfg.data.dataset in DATASETS, "data.dataset", f"is {cfg.data.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    need(bool(cfg.data.splits), "data.splits", "is empty")
    need("test" not in cfg.data.splits, "data.splits", "includes 'test': training never sees the test split")


def with_declared_bands(cfg):
    """`cfg` with each empty band list of `model.modalities` replaced by the bands the data declares, in the data's
    order (a 224-band cube needs no YAML listing 224 names); the run's saved config and hash hold the names."""
    empty = [m for m, bands in cfg.model.modalities.items() if not bands]
    if not empty:
        return cfg
    from mmfuse_fast.data import declared_bands

    declared = declared_bands(cfg.data, empty)
    modalities = {m: list(bands) or list(declared[m]) for m, bands in cfg.model.modalities.items()}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, modalities=modalities))


def check_inputs(backbone, dataset, larger_ok: bool = False) -> None:
    """Refuses, before training, a dataset whose samples do not fit the model (`model.img_size`, modalities, band
    counts), naming the key and the sample. `larger_ok`: larger rasters are fine (segmentation crops them)."""
    if len(dataset) == 0:
        raise DataError("the dataset is empty: check data.root and data.splits")
    sample = dataset[0]
    name = sample.get("id", 0) if isinstance(sample, dict) else 0
    size = backbone.img_size
    for m, bands in backbone.bands.items():
        if m not in sample:
            continue  # a modality the data does not have is the model's call (missing_modality)
        shape = tuple(sample[m].shape)
        if len(shape) != 3 or shape[0] != len(bands):
            raise DataError(f"sample {name!r}: modality {m!r} has shape {shape}; the model takes {len(bands)} "
                            f"bands {list(bands)} (config key 'model.modalities.{m}')")
        h, w = shape[1:]
        if (h, w) != (size, size) and not (larger_ok and h >= size and w >= size):
            need = f"at least {size}x{size}" if larger_ok else f"{size}x{size}"
            raise ConfigError(f"config key 'model.img_size' is {size} but sample {name!r} of the data has "
                              f"{m!r} images of {h}x{w} px (the model needs {need})")
