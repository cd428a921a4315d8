"""Self-supervised pretraining: the step loop, written to read like the recipe.

    dataset -> rank's slice of the seeded stream -> model [FSDP2 | DDP] [compile] -> fused AdamW -> TrainStep
    for each step: micro-batches -> step (eager or CUDA graph replay) -> every N steps: read metrics, log;
    every M steps and on SIGTERM/SIGINT: checkpoint (atomic, rank 0)

`train_step` below is the plain eager fp32 reference step (the benchmark baseline). The loop runs
`engine.step.TrainStep`: bf16 autocast on CUDA, the whole step captured as one CUDA graph, fused AdamW with the
learning rate as a device tensor, non-finite steps skipped on the device, metrics read every `log_every` steps.

Distributed (torchrun): see engine/distributed.py. `train.batch_size` is the global batch per optimizer step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmfuse_fast.config import ConfigError, PretrainConfig, save_config
from mmfuse_fast.engine.checkpoint import (CheckpointError, config_hash, load_checkpoint, rng_state,
                                           save_checkpoint, set_rng_state)
from mmfuse_fast.engine.distributed import (DistInfo, broadcast_flag, build_rank_loader, init_distributed,
                                            shutdown_distributed, wrap_model)
from mmfuse_fast.engine.logging import LoggingConfig, MetricLogger, truncate_metrics
from mmfuse_fast.engine.observe import TensorBoardWriter, ThroughputMeter, peak_tflops
from mmfuse_fast.engine.optim import backward_and_step, build_optimizer, lr_at
from mmfuse_fast.engine.runtime import prepare_run_dir, resolve_device, seed_everything, validate_config
from mmfuse_fast.engine.step import TrainStep, nvtx_range, resolve_amp

__all__ = ["pretrain", "train_step", "restore_training_state", "training_state", "StopSignal"]

CONFIG_NAME = "config.yaml"


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, grad_clip: float,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step; returns detached device scalars (loss, loss_rec, loss_con, grad_norm). No host
    sync."""
    out = model(batch, generator=generator)
    grad_norm = backward_and_step(out["loss"], optimizer, grad_clip)
    return {"loss": out["loss"].detach(), "loss_rec": out["loss_rec"].detach(),
            "loss_con": out["loss_con"].detach(), "grad_norm": grad_norm.detach()}


def training_state(step: int, optimizer: torch.optim.Optimizer, samples_seen: int, cfg_hash: str,
                   generators: dict[str, torch.Generator]) -> dict:
    """What besides the weights a run needs to continue exactly: plain values and tensors only."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "samples_seen": samples_seen,
        "config_hash": cfg_hash,
        "rng": rng_state(generators),
    }


def restore_training_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg_hash: str,
                           generators: dict[str, torch.Generator], fsdp: bool = False) -> dict:
    state = load_checkpoint(ckpt, None if fsdp else model)
    if state.get("config_hash") != cfg_hash:
        raise CheckpointError(
            f"cannot resume from {ckpt}: the config differs from the run's (hash {state.get('config_hash')} vs "
            f"{cfg_hash}); only train.steps, log/checkpoint intervals, device, data.root and data.num_workers may "
            f"change on resume"
        )
    if fsdp:  # full (gathered) state dicts, loaded into the sharded model and optimizer
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from mmfuse_fast.engine.checkpoint import resolve_weights

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_file(str(resolve_weights(ckpt))), options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], generators)
    return state


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the current step and stops. A second SIGINT
    interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False, dataset: Dataset | None = None,
             progress: bool = True) -> dict:
    """Pretrains `cfg.model` on `cfg.data.splits`; writes config.yaml, metrics.jsonl and checkpoints to `run_dir`.

    Under torchrun (WORLD_SIZE > 1) it runs data-parallel (DDP, or FSDP2 with train.distributed=fsdp2); rank 0
    logs and checkpoints. `dataset` replaces the configured dataset (tests, experiment runners). Returns a summary:
    run_dir, step, the last logged metrics, the final checkpoint path, the wall time, and `interrupted` (the
    signal's name) / `exit_code` when SIGTERM or SIGINT stopped the run early."""
    validate_config(cfg)
    info, dist_device = init_distributed(cfg.train.device)
    try:
        out = _pretrain(cfg, run_dir, resume, dataset, progress, info, dist_device)
        if info.enabled:  # no rank tears the group down while another still has collectives in flight
            import torch.distributed as dist

            dist.barrier(group=info.cpu_group)
        return out
    finally:
        shutdown_distributed(info)


def _pretrain(cfg: PretrainConfig, run_dir, resume: bool, dataset, progress: bool, info: DistInfo,
              dist_device) -> dict:
    from mmfuse_fast.data import build_dataset
    from mmfuse_fast.models import build_model

    t_start = time.perf_counter()
    tc = cfg.train
    device = dist_device if dist_device is not None else resolve_device(tc.device)
    steps, batch_size, accum, world = tc.steps, tc.batch_size, tc.grad_accum_steps, info.world
    if batch_size % (world * accum):
        raise ConfigError(f"config key 'train.batch_size' ({batch_size}, the global batch) must be a multiple of "
                          f"world size x train.grad_accum_steps = {world} x {accum}")
    micro_batch = batch_size // (world * accum)
    run_dir, ckpt = prepare_run_dir(run_dir, resume)
    seed_everything(tc.seed)
    amp_dtype = resolve_amp(tc.amp, device)

    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.data.splits, bands=cfg.model.modalities)
    model = build_model(cfg.model).to(device)
    flops_per_sample = model.flops_per_sample() if hasattr(model, "flops_per_sample") else None
    fsdp = info.enabled and tc.distributed == "fsdp2"
    if fsdp:  # sharded before the optimizer sees the parameters
        model = wrap_model(model, info, device, "fsdp2", amp_dtype)
    optimizer = build_optimizer(model, cfg.optim, device, engine=True)
    generator = torch.Generator(device).manual_seed(tc.seed)  # masks and crops (drawn for the global batch)
    generators = {"model": generator}
    cfg_hash = config_hash(cfg)

    step, engine_state = 0, {}
    if ckpt is not None:
        state = restore_training_state(ckpt, model, optimizer, cfg_hash, generators, fsdp=fsdp)
        step, engine_state = state["step"], state.get("engine", {})
    if info.is_main:
        truncate_metrics(run_dir, step)  # a resumed run re-logs what came after its checkpoint
        save_config(cfg, run_dir / CONFIG_NAME)

    net = model if fsdp else wrap_model(model, info, device, tc.distributed, amp_dtype)
    no_sync = getattr(net, "no_sync", None) if (info.enabled and not fsdp and accum > 1) else None
    if tc.compile:
        net = torch.compile(net)
    step_fn = TrainStep(net, optimizer, device=device, optim_cfg=cfg.optim, total_steps=steps,
                        modalities=cfg.model.modalities, contrastive_weight=cfg.model.contrastive_weight,
                        amp=tc.amp, grad_accum_steps=accum, max_bad_steps=tc.max_bad_steps,
                        cuda_graph=tc.cuda_graph and not fsdp, world=world, generator=generator, start_step=step,
                        no_sync=no_sync, graph_warmup=11 if info.enabled else 3)
    step_fn.load_state_dict(engine_state)

    loader = build_rank_loader(dataset, batch_size, micro_batch, tc.seed, info.rank, world, step,
                               cfg.data.num_workers, device)
    batches = iter(loader)
    model.train()
    last_ckpt, interrupted = ckpt, None
    meter = ThroughputMeter(device, batch_size, flops_per_sample, peak_tflops(device, amp_dtype))
    tb = TensorBoardWriter(run_dir, enabled=info.is_main)  # before the progress bar: it may print a note
    logger = MetricLogger(run_dir, LoggingConfig(every=tc.log_every, progress=progress), total_steps=steps,
                          start_step=step, desc="pretrain", batch_size=batch_size) if info.is_main else None
    stop = StopSignal()
    stop.install()
    group = info.group if info.enabled else None

    def save(step: int) -> Path | None:
        step_fn.check(group)  # never save after max_bad_steps non-finite steps
        model_state = None
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(model, options=opts)
            optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
        else:
            optim_state = optimizer.state_dict()
        path = None
        if info.is_main:
            state = training_state(step, optimizer, step * batch_size, cfg_hash, generators)
            state["optimizer"] = optim_state
            state["engine"] = step_fn.state_dict()
            path = save_checkpoint(run_dir, step, model, state, model_state=model_state)
        if info.enabled:
            import torch.distributed as dist

            dist.barrier(group=info.cpu_group)
        return path

    try:
        with logger if logger is not None else contextlib.nullcontext():
            while step < steps:
                meter.data_start()
                with nvtx_range("data"):
                    micro = [next(batches) for _ in range(accum)]
                meter.data_end()
                with nvtx_range("step"):
                    step_fn(micro)
                step += 1
                meter.step_done()
                if logger is not None:
                    logger.tick(step)
                log_now = step % tc.log_every == 0 or step == steps
                ckpt_now = step % tc.checkpoint_every == 0 or step == steps
                if log_now:
                    record = step_fn.read_metrics(group)  # the loop's one host sync; raises after K bad steps
                    record["lr"] = lr_at(step - 1, cfg.optim, steps)
                    record.update(meter.interval())
                    if logger is not None:
                        logger.log(step, record)
                        tb.write(step, logger.last)
                if not info.enabled or log_now or ckpt_now:  # ranks agree on when to stop
                    if broadcast_flag(stop.signum is not None, info):
                        interrupted = signal.Signals(stop.signum).name if stop.signum else "SIGTERM"
                if ckpt_now or interrupted:
                    last_ckpt = save(step) or last_ckpt
                if interrupted:
                    break
            step_fn.check(group)
    finally:
        stop.uninstall()
        tb.close()

    out = {
        "run_dir": str(run_dir),
        "step": step,
        "metrics": logger.last if logger is not None else {},
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "wall_s": round(time.perf_counter() - t_start, 3),
        "rank": info.rank,
        "world_size": world,
    }
    if interrupted:
        out["interrupted"] = interrupted
        out["exit_code"] = 128 + int(getattr(signal, interrupted))
    return out
