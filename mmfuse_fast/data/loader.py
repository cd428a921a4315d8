"""A DataLoader whose workers write each batch straight into a reusable shared-memory slot.

Why: a stock DataLoader worker collates every batch into a fresh shared-memory segment, which the kernel allocates
and zeroes page by page and the main process maps again. For BigEarthNet-sized samples (0.8 MB) that costs about
1 ms per sample on a small VM: more than reading the sample from the packed LMDB. Here the main process owns a ring
of batch buffers in shared memory. Each batch request names the slot its worker fills; the worker sends back only
the slot number and the non-tensor fields (ids), and the main process yields views of the slot.

A dataset with a `read_sample_into(index, out)` method (the packed reader's raw values) writes each sample straight
into its row of the slot: `out` is {key: the row's tensor} for the tensor fields of the layout, and the method
returns the sample's other fields, or None when it cannot (then the sample is read the ordinary way).

A slot is handed out again only when no tensor viewing it is alive in the main process (the storage's use count is
back to what the ring itself holds), so a caller that keeps batches, or views of them, sees what a DataLoader would
have given it: the ring then simply grows. A batch whose samples do not fit the layout read from sample 0 (another
shape or dtype, other keys) is collated the stock way, so the results are always those of `default_collate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

__all__ = ["SharedBatchLoader"]

Layout = dict[str, tuple[torch.Size, torch.dtype]]  # tensor fields of a sample: key -> (shape, dtype)


def _storage_use_count(tensor: torch.Tensor) -> int | None:
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(tensor.untyped_storage()._cdata)


class _BatchRequest(list):
    """The sample indices of one batch, plus the slot (and its buffers) the worker writes the batch into."""

    slot: int
    buffers: dict[str, torch.Tensor]


class _FilledSlot:
    """What a worker sends back: the slot it filled and the collated non-tensor fields, or (`collated`) a batch
    collated the stock way because its samples did not fit the slot layout."""

    def __init__(self, slot: int, size: int, extras: dict | None, collated: Any = None):
        self.slot, self.size, self.extras, self.collated = slot, size, extras, collated


def _pass_through(filled: _FilledSlot) -> _FilledSlot:
    return filled


def _fits(sample: Any, layout: Layout, keys: tuple) -> bool:
    if not isinstance(sample, Mapping) or tuple(sample) != keys:
        return False
    return all(isinstance(sample[k], torch.Tensor) and (sample[k].shape, sample[k].dtype) == spec
               for k, spec in layout.items())


class _SlotWriter(Dataset):
    """Runs in the worker: reads the samples of a request and writes their tensor fields into the request's slot."""

    def __init__(self, dataset: Dataset, layout: Layout, keys: tuple):
        self.dataset, self.layout, self.keys = dataset, layout, keys
        self._mapped: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, request: _BatchRequest) -> _FilledSlot:
        # holding the slot keeps this process's mapping of it: no fresh mmap and page faults per batch
        self._mapped[request.slot] = request.buffers
        written = self._write_in_place(request)
        if written is not None:
            return written
        samples = [self.dataset[i] for i in request]
        if not all(_fits(s, self.layout, self.keys) for s in samples):
            return _FilledSlot(request.slot, len(samples), None, default_collate(samples))
        for key, buffer in request.buffers.items():
            for row, sample in enumerate(samples):
                buffer[row].copy_(sample[key])
        other = [k for k in self.keys if k not in self.layout]
        extras = default_collate([{k: s[k] for k in other} for s in samples]) if other else {}
        return _FilledSlot(request.slot, len(samples), extras)

    def _write_in_place(self, request: _BatchRequest) -> _FilledSlot | None:
        """The batch written row by row by the dataset's `read_sample_into`; None if it has none, or a sample
        did not fit (the rows written so far are then overwritten by the ordinary path)."""
        read_into = getattr(self.dataset, "read_sample_into", None)
        if read_into is None:
            return None
        rest = []
        for row, index in enumerate(request):
            fields = read_into(index, {k: buffer[row] for k, buffer in request.buffers.items()})
            if fields is None or tuple(self.layout) + tuple(fields) != self.keys:
                return None
            rest.append(fields)
        return _FilledSlot(request.slot, len(request), default_collate(rest) if rest and rest[0] else {})


class _SlotRing:
    """The main process's batch buffers, and which of them are free to be filled again."""

    def __init__(self, layout: Layout, batch_size: int, shared: bool):
        self.layout, self.batch_size, self.shared = layout, batch_size, shared
        self.slots: list[dict[str, torch.Tensor]] = []
        self._idle_counts: list[dict[str, int | None]] = []  # use count of each buffer with no view alive
        self.in_flight: dict[int, int] = {}  # slot -> the iteration that requested it
        self.iteration = 0

    def _idle(self, slot: int) -> bool:
        return all(count is not None and _storage_use_count(self.slots[slot][k]) == count
                   for k, count in self._idle_counts[slot].items())

    def acquire(self, iteration: int) -> tuple[int, dict[str, torch.Tensor]]:
        for slot in range(len(self.slots)):
            if slot not in self.in_flight and self._idle(slot):
                break
        else:
            buffers = {}
            for key, (shape, dtype) in self.layout.items():
                buffer = torch.empty((self.batch_size, *shape), dtype=dtype)
                buffers[key] = buffer.share_memory_() if self.shared else buffer
            slot = len(self.slots)
            self.slots.append(buffers)
            self._idle_counts.append({k: _storage_use_count(b) for k, b in buffers.items()})
        self.in_flight[slot] = iteration
        return slot, self.slots[slot]

    def release_requested_by(self, iteration: int) -> None:
        self.in_flight = {slot: it for slot, it in self.in_flight.items() if it != iteration}

    def batch(self, filled: _FilledSlot, pin_memory: bool) -> Any:
        self.in_flight.pop(filled.slot, None)
        if filled.collated is not None:
            return filled.collated
        views = {}
        for key, buffer in self.slots[filled.slot].items():
            view = buffer[: filled.size]  # a new view even for a full batch: it is what marks the slot as in use
            views[key] = view.pin_memory() if pin_memory else view
        return {**views, **filled.extras}


class _SlotBatchSampler(Sampler[_BatchRequest]):
    def __init__(self, batch_sampler: BatchSampler, ring: _SlotRing):
        self.batch_sampler, self.ring = batch_sampler, ring

    def __iter__(self) -> Iterator[_BatchRequest]:
        iteration = self.ring.iteration  # the SharedBatchLoader iteration this DataLoader iteration serves
        for indices in self.batch_sampler:
            request = _BatchRequest(indices)
            request.slot, request.buffers = self.ring.acquire(iteration)
            yield request

    def __len__(self) -> int:
        return len(self.batch_sampler)


class SharedBatchLoader:
    """Iterates like `DataLoader(dataset, batch_size, ...)` with the default collate, for datasets whose samples are
    dicts of fixed-shape tensors (plus ids and other small fields), without a fresh shared-memory batch per step.

    The tensor layout is read from `dataset[0]` in the calling process. Samples that are not dicts fall back to a
    plain DataLoader. With `pin_memory` each yielded tensor is a pinned copy (from PyTorch's caching host allocator,
    which tracks the non-blocking copies made from it), so the slot is free as soon as the batch is yielded."""

    def __init__(self, dataset: Dataset, batch_size: int, *, sampler: Sampler | None = None, shuffle: bool = False,
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None,
                 generator: torch.Generator | None = None, drop_last: bool = False,
                 persistent_workers: bool | None = None):
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        first = dataset[0] if len(dataset) else None
        keys = tuple(first) if isinstance(first, Mapping) else ()
        layout = {k: (v.shape, v.dtype) for k, v in first.items() if isinstance(v, torch.Tensor)} if keys else {}
        self.pin_memory = pin_memory
        self.ring = _SlotRing(layout, batch_size, shared=num_workers > 0) if layout else None
        common = dict(num_workers=num_workers, prefetch_factor=prefetch_factor, generator=generator,
                      persistent_workers=persistent_workers)
        if self.ring is None:
            self._loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                      pin_memory=pin_memory, **common)
        else:
            batches = _SlotBatchSampler(BatchSampler(sampler, batch_size, drop_last), self.ring)
            self._loader = DataLoader(_SlotWriter(dataset, layout, keys), batch_sampler=batches,
                                      collate_fn=_pass_through, **common)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        if self.ring is None:
            yield from self._loader
            return
        self.ring.iteration += 1
        iteration = self.ring.iteration
        iterator = iter(self._loader)
        try:
            for filled in iterator:
                yield self.ring.batch(filled, self.pin_memory)
        finally:
            # Workers may still be filling the slots of batches this iteration requested but never took. A
            # non-persistent iterator is shut down first; persistent workers finish their queue before the next
            # iteration's first request, so their slots can be released now.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None and not self._loader.persistent_workers:
                shutdown()
            self.ring.release_requested_by(iteration)
