"""Data order and loading: a seeded infinite sampler whose order is a pure function of (seed, epoch, position)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mmfuse_fast.data.loader import SharedBatchLoader

__all__ = ["epoch_order", "InfiniteSampler", "build_loader", "to_device"]


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
