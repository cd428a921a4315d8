"""SharedBatchLoader: the batches of a stock DataLoader, written into reused shared-memory slots."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mmfuse_fast.data.loader import SharedBatchLoader, _storage_use_count


class Scenes(Dataset):
    """Dict samples with two image tensors, a label, an id and an int, all derived from the index."""

    def __init__(self, n: int = 23, odd_shape_at: int | None = None, bad_at: int | None = None):
        self.n, self.odd_shape_at, self.bad_at = n, odd_shape_at, bad_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.bad_at:
            raise ValueError(f"patch P{i:03d}: band B05 is missing")
        side = 7 if i == self.odd_shape_at else 5
        g = torch.Generator().manual_seed(i)
        return {"s2": torch.randn(3, side, side, generator=g), "s1": torch.randn(2, 5, 5, generator=g).half(),
                "label": torch.tensor([i % 2, i % 3], dtype=torch.float32), "id": f"P{i:03d}", "n": i}


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert list(a) == list(b)
        for key in b:
            if isinstance(b[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_kept_batches_equal_a_stock_dataloader(workers, drop_last):
    data = Scenes()
    got = list(SharedBatchLoader(data, 4, num_workers=workers, drop_last=drop_last))
    expected = list(DataLoader(data, batch_size=4, drop_last=drop_last))
    assert_same_batches(got, expected)  # every batch kept alive: no slot may have been refilled under it


def test_slots_are_reused_once_batches_are_dropped():
    data = Scenes(n=64)
    loader = SharedBatchLoader(data, 4, num_workers=1, prefetch_factor=2)
    expected = list(DataLoader(data, batch_size=4))
    for epoch in range(2):
        for batch, ref in zip(loader, expected):
            assert torch.equal(batch["s2"], ref["s2"]) and batch["id"] == ref["id"]
    # 2 prefetched + the one being yielded + the previous one still bound to `batch`: 16 batches, a handful of slots
    assert len(loader.ring.slots) <= 5
    assert not loader.ring.in_flight


def test_a_kept_view_keeps_its_slot():
    data = Scenes(n=16)
    loader = SharedBatchLoader(data, 4)
    kept = [batch["s2"][1:3, 0] for batch in loader]  # views of views: the batch dicts themselves are gone
    for i, view in enumerate(kept):
        assert torch.equal(view, torch.stack([data[4 * i + 1]["s2"], data[4 * i + 2]["s2"]])[:, 0])
    assert len(loader.ring.slots) == 4


def test_storage_use_count_is_available():
    # without it every batch gets a new slot: still correct, but the loader loses its reason to exist
    t = torch.zeros(3)
    base = _storage_use_count(t)
    view = t[:2]
    assert base is not None and _storage_use_count(t) == base + 1
    del view
    assert _storage_use_count(t) == base


def test_samples_that_do_not_fit_the_layout_are_collated_the_stock_way():
    data = Scenes(n=8, odd_shape_at=5)
    loader = SharedBatchLoader(data, 4, num_workers=1)
    batches = iter(loader)
    assert_same_batches([next(batches)], [next(iter(DataLoader(data, batch_size=4)))])
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        next(batches)  # the error default_collate itself gives for these samples


def test_non_dict_samples_use_a_plain_dataloader():
    data = [(torch.full((2,), float(i)), i) for i in range(5)]
    loader = SharedBatchLoader(data, 2)
    assert loader.ring is None
    got = list(loader)
    assert torch.equal(got[2][0], torch.full((1, 2), 4.0)) and got[2][1].tolist() == [4]


def test_abandoned_iteration_then_a_new_one_with_persistent_workers():
    data = Scenes(n=40)
    loader = SharedBatchLoader(data, 4, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    for i, _ in enumerate(loader):
        if i == 1:
            break  # workers are still filling the prefetched slots
    ids = [pid for batch in loader for pid in batch["id"]]
    assert sorted(ids) == [f"P{i:03d}" for i in range(40)]
    assert not loader.ring.in_flight


@pytest.mark.parametrize("workers", [0, 1])
def test_a_dataset_error_reaches_the_caller_with_its_message(workers):
    # not persistent: the loader shuts its worker down on the error (a persistent worker whose iteration died waits
    # for the garbage collector, which then spends PyTorch's 5 s join timeout on it)
    loader = SharedBatchLoader(Scenes(n=12, bad_at=9), 4, num_workers=workers, persistent_workers=False)
    with pytest.raises(ValueError, match="patch P009: band B05 is missing"):
        list(loader)


def test_the_engines_endless_loader_follows_the_seeded_stream_with_a_worker():
    from mmfuse_fast.engine.data import build_loader, epoch_order

    data = Scenes(n=10)
    stream = [int(i) for epoch in range(4) for i in epoch_order(10, 7, epoch)]
    batches = iter(build_loader(data, 4, seed=7, start=6, num_workers=1))
    ids = [pid for _ in range(6) for pid in next(batches)["id"]]  # 24 samples across three epoch boundaries
    assert ids == [f"P{i:03d}" for i in stream[6:30]]


class WritesInPlace(Scenes):
    """Scenes that also write themselves into a batch row (`read_sample_into`), except at `refuse_at`."""

    def __init__(self, n: int = 23, refuse_at: int | None = None):
        super().__init__(n)
        self.refuse_at = refuse_at
        self.written = 0

    def read_sample_into(self, i: int, out: dict) -> dict | None:
        if i == self.refuse_at:
            return None
        sample = self[i]
        for key, tensor in out.items():
            tensor.copy_(sample[key])
        self.written += 1
        return {"id": sample["id"], "n": sample["n"]}


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("refuse_at", [None, 6])
def test_samples_written_in_place_equal_a_stock_dataloader(workers, refuse_at):
    data = WritesInPlace(refuse_at=refuse_at)
    got = list(SharedBatchLoader(data, 4, num_workers=workers))
    assert_same_batches(got, list(DataLoader(data, batch_size=4)))
    if workers == 0:
        assert data.written >= 20  # the in-place path was taken (all but the refused batch)
