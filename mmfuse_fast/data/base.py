"""The base every reader shares: bands selected by name, normalization statistics, skip-on-error with a count.

Every reader takes the same constructor vocabulary::

    Reader(root, split=..., modalities=..., bands=None, normalize=True, stats=None, on_error="raise", ...)

- `split`: a split name, a list of them, or "all" (also None) for every sample (`mmfuse_fast.data.splits`).
- `bands`: {modality: [band names]} selecting and ordering channels; a modality left out, or given an empty list,
  gets every band the data declares, in the data's order.
- `stats`: {modality: {band: (mean, std)}} or {modality: path of a CSV} (`read_stats_csv`) for normalization.
- `on_error`: "raise" (a bad sample raises a `DataError` naming its file or patch) or "skip" (a bad sample is
  replaced, deterministically, by the next good one, warned about once and counted in `skipped`).

`skipped` is the number of distinct samples left out: metadata rows dropped when the dataset was built plus
samples found bad when read, by this process or any of its DataLoader workers (the read-time flags live in shared
memory, made when the dataset is built, so workers forked or spawned later report into it). `skipped_count`
finds the reader under `Subset`s and other wrappers. Distributed ranks each hold their own count: sum them.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmfuse_fast.errors import ConfigError, DataError, DataFileError

__all__ = ["SkipBadSamples", "BandDataset", "skipped_count", "read_stats_csv", "resolve_stats"]

ON_ERROR = ("raise", "skip")


class SkipBadSamples:
    """`__getitem__` with the index check and skip-on-error of the readers.

    The class sets `ids`, `on_error` and implements `_load_sample(index) -> sample`, which raises a `DataError` for
    a bad sample; it calls `track_skipped(rows_dropped)` once its samples are known. With `on_error="skip"` a bad
    sample is replaced by the next good index (wrapping around), warned about once and counted in `skipped`; when
    every sample is bad, `_all_bad_error` is raised.
    """

    _all_bad_error: type[DataError] = DataError
    _rows_dropped = 0
    _bad_flags: torch.Tensor | None = None

    @staticmethod
    def check_on_error(on_error: str) -> str:
        if on_error not in ON_ERROR:
            raise ConfigError(f"reader option on_error must be 'raise' or 'skip', got {on_error!r}")
        return on_error

    def track_skipped(self, rows_dropped: int = 0) -> None:
        """Starts the count of skipped samples: `rows_dropped` metadata rows left out already, and one shared flag
        per sample for those found bad when read."""
        self._rows_dropped = int(rows_dropped)
        self._bad_flags = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    def _flags(self) -> torch.Tensor:
        if self._bad_flags is None or len(self._bad_flags) != len(self):  # ids replaced after construction
            self._bad_flags = torch.zeros(len(self), dtype=torch.uint8).share_memory_()
        return self._bad_flags

    @property
    def skipped(self) -> int:
        """Distinct samples left out so far, over this process and its DataLoader workers."""
        return self._rows_dropped + int(self._flags().sum())

    def skipped_ids(self) -> list[str]:
        """The ids of the samples found bad when read (metadata rows dropped at build time have no index)."""
        return [self.ids[i] for i in torch.nonzero(self._flags()).flatten().tolist()]

    def _load_sample(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index %= len(self)
        if self.on_error == "raise":
            return self._load_sample(index)
        flags = self._flags()
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if flags[candidate]:
                continue
            try:
                return self._load_sample(candidate)
            except DataError as error:
                flags[candidate] = 1
                warnings.warn(f"skipping bad sample {candidate} ({self.ids[candidate]}): {error}", stacklevel=2)
        raise self._all_bad_error(f"every one of the {len(self)} samples is bad (on_error='skip')")


def skipped_count(dataset) -> int | None:
    """The samples the readers under `dataset` left out (on_error=skip), as each counts them in its integer
    `skipped`: distinct samples, over the process and its DataLoader workers. Readers are found through wrappers
    that hold their data as `.dataset` (Subset) or `.datasets` (ConcatDataset). None when no reader under
    `dataset` counts them."""
    count = getattr(dataset, "skipped", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    parts = getattr(dataset, "datasets", None)
    if parts is not None:
        counts = [c for c in map(skipped_count, parts) if c is not None]
        return sum(counts) if counts else None
    inner = getattr(dataset, "dataset", None)
    return None if inner is None or inner is dataset else skipped_count(inner)


class BandDataset(SkipBadSamples, Dataset):
    """Base of the readers: the band selection by name, the normalization arrays, skip-on-error.

    A subclass calls `select_bands(modalities, available, bands)` with the bands its data declares ({modality:
    band names in the data's order}), sets `ids`, and applies `normalize_in_place` to each (C, H, W) float32 image
    once `set_mean_std` has been given the statistics.
    """

    _mean_std: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def select_bands(self, modalities: Sequence[str] | str, available: Mapping[str, Sequence[str]],
                     bands: Mapping[str, Sequence[str] | None] | None, normalize: bool, on_error: str) -> None:
        """Sets `modalities`, `bands` ({modality: band names in channel order}), `normalize` and `on_error`."""
        self.check_on_error(on_error)
        where = f"the dataset at {getattr(self, 'root', '?')}"
        modalities = (modalities,) if isinstance(modalities, str) else tuple(modalities)
        if not modalities:
            raise ConfigError(f"no modality requested from {where} (it has {sorted(available)})")
        for m in modalities:
            if m not in available:
                raise DataError(f"unknown modality {m!r}: {where} has {sorted(available)}")
        if len(set(modalities)) != len(modalities):
            raise ConfigError(f"modality listed twice in {list(modalities)}")
        bands = dict(bands or {})
        extra = sorted(set(bands) - set(modalities))
        if extra:
            raise ConfigError(f"bands given for modalities {extra}, which are not among the requested "
                              f"{list(modalities)}")
        self.modalities = modalities
        self.bands = {}
        for m in modalities:
            names = tuple(bands.get(m) or available[m])  # none listed: every band the data declares
            for name in names:
                if name not in available[m]:
                    raise DataError(f"unknown band {name!r} for modality {m!r} of {where}; its bands: "
                                    f"{list(available[m])}")
            if len(set(names)) != len(names):
                raise ConfigError(f"band listed twice for modality {m!r}: {list(names)}")
            self.bands[m] = names
        self.normalize = bool(normalize)
        self.on_error = on_error

    def set_mean_std(self, stats: Mapping[str, Mapping[str, Sequence[float]]], constant_ok: bool = False) -> None:
        """The normalization of the selected bands from {modality: {band: (mean, std)}}. A std <= 0 is an error,
        or with `constant_ok` (statistics computed from the data, where a band can be constant) divides by 1."""
        self._mean_std = {}
        for m in self.modalities:
            mean = np.array([stats[m][b][0] for b in self.bands[m]], np.float32).reshape(-1, 1, 1)
            std = np.array([stats[m][b][1] for b in self.bands[m]], np.float32).reshape(-1, 1, 1)
            if not (std > 0).all():
                if not constant_ok:
                    bad = [b for b, s in zip(self.bands[m], std.ravel()) if not s > 0]
                    raise DataError(f"non-positive std in the {m} band statistics of bands {bad}")
                std = np.where(std > 0, std, 1.0).astype(np.float32)
            self._mean_std[m] = (mean, std)

    def normalize_in_place(self, image: np.ndarray, modality: str) -> np.ndarray:
        """(image - mean) / std over the channels of `modality`, written into `image` (float32 (C, H, W))."""
        mean, std = self._mean_std[modality]
        np.subtract(image, mean, out=image)
        np.divide(image, std, out=image)
        return image

    def __len__(self) -> int:
        return len(self.ids)


def read_stats_csv(path: str | os.PathLike, band_names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Per-band (mean, std) from a CSV with `mean` and `std` columns and a band column holding band names or
    1-based band numbers (`Band_Number` in EnMAP's `Normalize_Bands.csv`); without a band column, row i is band i.
    A row with both cells empty gives (nan, nan): a band the file declares without statistics.

    A row naming no band of `band_names`, a band given twice, or a std <= 0 is an error naming the file."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    try:
        table = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise DataFileError(f"{path}: unreadable statistics CSV ({error})") from None
    columns = {str(c).strip().lower(): c for c in table.columns}
    if "mean" not in columns or "std" not in columns:
        raise DataFileError(f"{path}: needs 'mean' and 'std' columns, has {list(table.columns)}")
    band_column = next((columns[c] for c in ("band", "band_name", "band_number", "name") if c in columns), None)
    keys = list(table[band_column]) if band_column is not None else list(range(1, len(table) + 1))
    out = {}
    for row, key in enumerate(keys):
        name = _band_of(key, band_names)
        if name is None:
            raise DataFileError(f"{path}: row {row + 1} is for band {key!r}, which the data does not have (its "
                                f"{len(band_names)} bands: {_preview(band_names)})")
        if name in out:
            raise DataFileError(f"{path}: band {name!r} has two rows")
        mean, std = float(table[columns["mean"]].iloc[row]), float(table[columns["std"]].iloc[row])
        empty = np.isnan(mean) and np.isnan(std)  # a band left without statistics (EnMAP's nodata-filled bands)
        if not empty and not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise DataFileError(f"{path}: band {name!r} has mean {mean}, std {std} (need finite values, std > 0)")
        out[name] = (mean, std)
    return out


def _band_of(key, band_names: Sequence[str]) -> str | None:
    """The band a statistics row is for: its name, or its 1-based number (int, float 3.0 or text "3")."""
    if isinstance(key, str):
        key = key.strip()
        if key in band_names:
            return key
        if not key.isdigit():
            return None
    try:
        number = float(key)
    except (TypeError, ValueError):
        return None
    if number != int(number) or not 1 <= number <= len(band_names):
        return None
    return band_names[int(number) - 1]


def _preview(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(map(str, names[:limit]))
    return shown + (", ..." if len(names) > limit else "")


def resolve_stats(stats: Mapping[str, Mapping[str, Sequence[float]] | str | os.PathLike] | None,
                  available: Mapping[str, Sequence[str]], required: Mapping[str, Sequence[str]]
                  ) -> dict[str, dict[str, tuple[float, float]]]:
    """{modality: {band: (mean, std)}} from `stats` whose values are such tables or CSV paths (`read_stats_csv`).

    A CSV must have a row for every band of `required` ({modality: selected bands}): statistics given as a file are
    never completed silently from the data. Bands whose row is empty are left out (the reader computes them) with a
    warning naming the file."""
    out = {}
    for m, value in (stats or {}).items():
        if m not in available:
            raise ConfigError(f"statistics given for modality {m!r}, which the data does not have "
                              f"({sorted(available)})")
        if isinstance(value, (str, os.PathLike)):
            table = read_stats_csv(value, available[m])
            missing = [b for b in required.get(m, ()) if b not in table]
            if missing:
                raise DataFileError(f"{value}: no statistics for the {m} bands {_preview(missing)}")
            empty = [b for b in required.get(m, ()) if np.isnan(table[b][0])]
            if empty:
                warnings.warn(f"{value}: no statistics for the {m} bands {_preview(empty)} (empty cells); "
                              f"computed from the data", stacklevel=3)
            out[m] = {b: v for b, v in table.items() if not np.isnan(v[0])}
        else:
            out[m] = {b: (float(v[0]), float(v[1])) for b, v in value.items()}
    return out
