"""Data-parallel runs under torchrun: process-group setup, DDP / FSDP2 wrapping, rank-sliced data order.

    torchrun --nproc_per_node 8 -m mmfuse_fast.cli pretrain --config base --run-dir runs/base

`train.batch_size` is the *global* batch of one optimizer step. Step k trains on samples [k·B, (k+1)·B) of the
seeded sample stream (engine/data.py); rank r takes the r-th contiguous slice of B / world samples, split into
`grad_accum_steps` micro-batches. The data order, the masks and the crops (drawn for the global batch, see
`set_data_parallel_group`, models/contract.py) are therefore the same whatever the world size: a run may resume on another number
of GPUs. NCCL on GPUs, gloo on CPUs; logging and checkpoints on rank 0.
"""

from __future__ import annotations

import gc
import importlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Sampler

from mmfuse_fast.data.loader import SharedBatchLoader
from mmfuse_fast.engine.data import InfiniteSampler

# Modules whose functions take `group=group.WORLD` as a default argument, evaluated at import: imported after
# init_process_group, those defaults hold the default group until exit, which defeats shutdown_distributed.
_WORLD_DEFAULT_MODULES = ("torch.distributed.nn.functional", "torch.distributed.optim.zero_redundancy_optimizer",
                          "torch.distributed.fsdp.sharded_grad_scaler")

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "RankSampler", "build_rank_loader",
           "wrap_model", "unwrap_model", "broadcast_flag"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: object = None  # the default process group when distributed
    cpu_group: object = None  # a gloo group for host-side flags (the default group itself with gloo)
    owns_group: bool = False  # we initialised it (and tear it down)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device | None]:
    """Initialises torch.distributed from torchrun's environment (WORLD_SIZE > 1); returns (info, device or None).

    Without torchrun (or with WORLD_SIZE=1) nothing happens. An already initialised default group is used as is."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistInfo(), None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        for module in _WORLD_DEFAULT_MODULES:
            importlib.import_module(module)
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")
    return DistInfo(rank, world, local_rank, dist.group.WORLD, cpu_group, owns), device


def shutdown_distributed(info: DistInfo) -> None:
    """Destroys the process groups that `init_distributed` created and frees them before returning.

    A gloo worker thread releases the tensors of a collective after the caller's wait() has returned, and that
    release takes the GIL. destroy_process_group() does not stop those threads; the group's destructor joins them,
    so the group must actually be freed here: a thread still waiting for the GIL when the interpreter finalizes is
    killed inside a noexcept destructor (SIGABRT, "terminate called without an active exception"). Hence this
    function drops `info`'s references and collects the cycles (autograd graphs, DDP) that may hold the group, and
    init_distributed imports _WORLD_DEFAULT_MODULES before it creates the group. Under FSDP2, torch's DTensor
    caches keep the device mesh and its group until exit; there the callers' final barrier (a collective without
    Python tensors, whose wait releases the GIL) lets the threads finish releasing the earlier collectives."""
    import torch.distributed as dist

    if info.owns_group and dist.is_initialized():
        info.group = info.cpu_group = None
        dist.destroy_process_group()
        gc.collect()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any (a host-side gloo all_reduce; no device sync)."""
    if not info.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return bool(t.item())


class RankSampler(Sampler[int]):
    """This rank's share of the seeded global sample stream: for each global batch of `global_batch` samples, the
    contiguous slice [rank·b, (rank+1)·b), b = global_batch / world; starts at global step `start_step`."""

    def __init__(self, n: int, seed: int, global_batch: int, rank: int = 0, world: int = 1, start_step: int = 0,
                 shuffle: bool = True):
        if global_batch % world:
            raise ValueError(f"train.batch_size={global_batch} must be a multiple of the world size {world}")
        self.stream = InfiniteSampler(n, seed=seed, shuffle=shuffle, start=start_step * global_batch)
        self.global_batch, self.rank, self.local = global_batch, rank, global_batch // world

    def __iter__(self) -> Iterator[int]:
        it = iter(self.stream)
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        while True:
            batch = [next(it) for _ in range(self.global_batch)]
            yield from batch[lo:hi]

    def __len__(self) -> int:
        return 2**62


def build_rank_loader(dataset: Dataset, global_batch: int, micro_batch: int, seed: int, rank: int, world: int,
                      start_step: int, num_workers: int, device: torch.device) -> SharedBatchLoader:
    """Endless loader of this rank's micro-batches (grad_accum_steps of them per step), pinned on CUDA."""
    sampler = RankSampler(len(dataset), seed, global_batch, rank, world, start_step)
    return SharedBatchLoader(
        dataset,
        micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    from mmfuse_fast.models.layers import Block, CrossBlock

    return [m for m in model.modules() if isinstance(m, (Block, CrossBlock))]


def unwrap_model(net: nn.Module) -> nn.Module:
    """The model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers; FSDP2 shards in place."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        else:
            return net


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, strategy: str,
               amp_dtype: torch.dtype | None) -> nn.Module:
    """DDP (default) or FSDP2 (`fully_shard` per transformer block, then the root) around `model`."""
    set_group = getattr(model, "set_data_parallel_group", None)  # global-batch losses (models/contract.py)
    if set_group is not None:
        set_group(info.group)
    if not info.enabled:
        return model
    if strategy == "fsdp2":
        import warnings

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # the model returns views (pred, mask) that nothing modifies in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for unit in _fsdp_units(model):
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect

    # the model's buffers are constants (positions, masks): no per-forward buffer broadcast
    params = inspect.signature(DDP.__init__).parameters
    kwargs = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
