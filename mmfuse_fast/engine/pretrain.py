"""Self-supervised pretraining of any registered model (models/contract.py) with the engine's step and loop.

    dataset -> rank's slice of the seeded stream -> model [FSDP2 | DDP] [compile] -> fused AdamW -> TrainStep
    -> engine/loop.py's run_loop (log, checkpoint, resume, signals)

Distributed (torchrun): see engine/distributed.py. `train.batch_size` is the global batch per optimizer step.
The run directory is held (engine/rundir.py's RunDirLock, by rank 0) from before anything in it is read until the
run ends.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmfuse_fast.config import ConfigError, PretrainConfig
from mmfuse_fast.engine.checkpoint import config_hash, hashed_config_values
from mmfuse_fast.engine.data import normalize_on_device
from mmfuse_fast.engine.distributed import (DistInfo, broadcast_flag, build_rank_loader, init_distributed,
                                            shutdown_distributed, wrap_model)
from mmfuse_fast.engine.logging import truncate_metrics
from mmfuse_fast.engine.loop import Run, restore_training_state, run_loop
from mmfuse_fast.engine.optim import build_optimizer
from mmfuse_fast.engine.rundir import RunDirLock, prepare_run_dir, write_run_configs
from mmfuse_fast.engine.runtime import (check_inputs, resolve_device, seed_everything, validate_config,
                                        with_declared_bands)
from mmfuse_fast.engine.step import TrainStep, resolve_amp
from mmfuse_fast.errors import RunDirError
from mmfuse_fast.ops import check_backend_available

__all__ = ["pretrain"]


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False, dataset: Dataset | None = None,
             progress: bool = True) -> dict:
    """Pretrains `cfg.model` on `cfg.data.splits`; writes config.yaml, metrics.jsonl and checkpoints to `run_dir`.

    Under torchrun (WORLD_SIZE > 1) it runs data-parallel (DDP, or FSDP2 with train.distributed=fsdp2); rank 0
    logs and checkpoints. `dataset` replaces the configured dataset (tests, experiment runners). Returns a summary:
    run_dir, step, the last logged metrics, the final checkpoint path, the wall time, and `interrupted` (the
    signal's name) / `exit_code` when SIGTERM or SIGINT stopped the run early."""
    validate_config(cfg)
    cfg = with_declared_bands(cfg)
    info, dist_device = init_distributed(cfg.train.device)
    try:
        with _hold_run_dir(run_dir, info):
            out = _pretrain(cfg, run_dir, resume, dataset, progress, info, dist_device)
            if info.enabled:  # no rank tears the group down while another still has collectives in flight
                import torch.distributed as dist

                dist.barrier(group=info.cpu_group)
        return out
    finally:
        shutdown_distributed(info)


@contextlib.contextmanager
def _hold_run_dir(run_dir, info: DistInfo):
    """Rank 0 holds the run directory for the whole run; when it cannot, every rank fails at once."""
    lock = RunDirLock(run_dir)
    refused = None
    if info.is_main:
        try:
            lock.acquire()
        except RunDirError as error:
            refused = error
    if broadcast_flag(refused is not None, info):
        raise refused or RunDirError(f"run directory {run_dir} is in use by another run (rank 0 could not hold it)")
    try:
        yield
    finally:
        lock.release()


def _pretrain(cfg: PretrainConfig, run_dir, resume: bool, dataset, progress: bool, info: DistInfo,
              dist_device) -> dict:
    from mmfuse_fast.data import build_dataset
    from mmfuse_fast.models import build_model

    tc = cfg.train
    device = dist_device if dist_device is not None else resolve_device(tc.device)
    check_backend_available(cfg.model.ops_backend, device)
    batch_size, accum, world = tc.batch_size, tc.grad_accum_steps, info.world
    if batch_size % (world * accum):
        raise ConfigError(f"config key 'train.batch_size' ({batch_size}, the global batch) must be a multiple of "
                          f"world size x train.grad_accum_steps = {world} x {accum}")
    micro_batch = batch_size // (world * accum)
    run_dir, resumed = prepare_run_dir(run_dir, resume, holder=info.is_main)
    seed_everything(tc.seed)
    amp_dtype = resolve_amp(tc.amp, device)

    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.data.splits, bands=cfg.model.modalities)
    model = build_model(cfg.model).to(device)
    check_inputs(model, dataset)
    dataset, on_device_normalize = normalize_on_device(dataset, device)  # packs ship stored values: fewer bytes
    fsdp = info.enabled and tc.distributed == "fsdp2"
    if fsdp:  # sharded before the optimizer sees the parameters
        model = wrap_model(model, info, device, "fsdp2", amp_dtype)
    optimizer = build_optimizer(model, cfg.optim, device)
    generator = torch.Generator(device).manual_seed(tc.seed)  # masks and crops (drawn for the global batch)
    generators = {"model": generator}
    cfg_hash = config_hash(cfg)

    step, engine_state, last_checkpoint = 0, {}, None
    if resumed is not None:
        state = restore_training_state(resumed, model, optimizer, cfg, generators, fsdp=fsdp)
        step, engine_state, last_checkpoint = state["step"], state.get("engine", {}), resumed.path
        del resumed  # its weights are in the model now: the host copy is not kept for the whole run
    if info.is_main:
        truncate_metrics(run_dir, step)  # a resumed run re-logs what came after its checkpoint
        write_run_configs(run_dir, cfg)

    net = model if fsdp else wrap_model(model, info, device, tc.distributed, amp_dtype)
    no_sync = getattr(net, "no_sync", None) if (info.enabled and not fsdp and accum > 1) else None
    if tc.compile:
        net = torch.compile(net)
    step_fn = TrainStep(net, optimizer, device=device, optim_cfg=cfg.optim, total_steps=tc.steps, model=model,
                        amp=tc.amp, grad_accum_steps=accum, max_bad_steps=tc.max_bad_steps,
                        cuda_graph=tc.cuda_graph and not fsdp, generator=generator, start_step=step,
                        no_sync=no_sync, graph_warmup=11 if info.enabled else 3,
                        batch_transform=on_device_normalize)
    step_fn.load_state_dict(engine_state)
    loader = build_rank_loader(dataset, batch_size, micro_batch, tc.seed, info.rank, world, step,
                               cfg.data.num_workers, device)
    model.train()
    flops = model.flops_per_sample() if hasattr(model, "flops_per_sample") else None
    return run_loop(Run(run_dir=run_dir, model=model, optimizer=optimizer, step_fn=step_fn, batches=iter(loader),
                        train=tc, optim_cfg=cfg.optim, cfg_hash=cfg_hash, config_values=hashed_config_values(cfg),
                        train_set=dataset, desc=f"pretrain {cfg.model.name}", start_step=step,
                        last_checkpoint=last_checkpoint, generators=generators, info=info, fsdp=fsdp,
                        flops_per_sample=flops, progress=progress))
