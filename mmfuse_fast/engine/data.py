"""Data order and loading: a seeded infinite sampler whose order is a pure function of (seed, epoch, position), and
the per-band normalization done on the device for readers that hand over raw values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mmfuse_fast.data.loader import SharedBatchLoader

__all__ = ["epoch_order", "InfiniteSampler", "build_loader", "to_device", "DeviceNormalize", "normalize_on_device"]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The sample order of one epoch: a permutation of range(n) drawn from (seed, epoch) alone."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class InfiniteSampler(Sampler[int]):
    """Yields the epochs' orders back to back, forever, starting at sample `start` of the stream.

    The stream is reproducible: sample k of it is `epoch_order(n, seed, k // n)[k % n]`, so a resumed run that
    starts at `start = samples_seen` sees exactly the samples the uninterrupted run would have seen."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, start: int = 0):
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.seed, self.shuffle, self.start = n, seed, shuffle, start

    def __iter__(self) -> Iterator[int]:
        epoch, pos = divmod(self.start, self.n)
        while True:
            for i in epoch_order(self.n, self.seed, epoch, self.shuffle)[pos:]:
                yield int(i)
            epoch, pos = epoch + 1, 0

    def __len__(self) -> int:  # a DataLoader asks; the stream itself has no end
        return 2**62


def build_loader(dataset: Dataset, batch_size: int, seed: int, start: int = 0, num_workers: int = 0,
                 device: torch.device | None = None, shuffle: bool = True) -> SharedBatchLoader:
    """An endless loader over `dataset` starting at sample `start` of the seeded stream."""
    sampler = InfiniteSampler(len(dataset), seed=seed, shuffle=shuffle, start=start)
    return SharedBatchLoader(
        dataset,
        batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device is not None and device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # worker seeds; leaves the global RNG alone
    )


def to_device(batch: dict, device: torch.device) -> dict:
    """Moves the tensors of a batch to `device` (non-blocking); other entries (ids) pass through."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DeviceNormalize:
    """`(x - mean) / std` per band, then NaN and inf (nodata) -> 0, applied to a batch already on the device.

    With a reader that returns the stored values (`PackedDataset(raw=True)`: integers, bf16 or float32 with NaN at
    nodata), the loader ships half the bytes or fewer and the host does no arithmetic; this transform then gives
    the numbers the reader's own normalization gives, bit for bit (the same float32 subtraction and division; a
    band with std <= 0 is divided by 1, as the readers do). Mean and std are device tensors made once; the call
    reads no value on the host, so it can run inside a captured CUDA graph."""

    def __init__(self, stats: Mapping[str, Mapping[str, Sequence[float]]], bands: Mapping[str, Sequence[str]],
                 device: torch.device | str):
        self.mean_std: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for modality, names in bands.items():
            mean = torch.tensor([float(stats[modality][b][0]) for b in names], dtype=torch.float32)
            std = torch.tensor([float(stats[modality][b][1]) for b in names], dtype=torch.float32)
            std = torch.where(std > 0, std, torch.ones_like(std))
            self.mean_std[modality] = (mean.reshape(-1, 1, 1).to(device), std.reshape(-1, 1, 1).to(device))

    @classmethod
    def for_dataset(cls, dataset, device: torch.device | str) -> DeviceNormalize | None:
        """The normalization `dataset` would apply on the host (its `normalization_stats()`), or None when it
        normalizes nothing."""
        stats = dataset.normalization_stats() if hasattr(dataset, "normalization_stats") else None
        return None if stats is None else cls(stats, dataset.bands, device)

    def __call__(self, batch: Mapping) -> dict:
        """A new batch dict with the modalities normalized (float32); other entries as they are."""
        out = dict(batch)
        for modality, (mean, std) in self.mean_std.items():
            if modality in out:
                x = (out[modality].float() - mean) / std
                out[modality] = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return out


def normalize_on_device(dataset, device: torch.device | str) -> tuple[Dataset, DeviceNormalize | None]:
    """(the dataset handing over its stored values, the DeviceNormalize that finishes them in the step) for readers
    that can (`raw_values()`: packs on the model grid), else (dataset, None): it normalizes on the host itself.
    The step then sees the numbers the host normalization gives, bit for bit."""
    raw_values = getattr(dataset, "raw_values", None)
    if raw_values is None or not getattr(dataset, "normalize", False):
        return dataset, None
    normalize = DeviceNormalize.for_dataset(dataset, device)
    return (raw_values(), normalize) if normalize is not None else (dataset, None)
