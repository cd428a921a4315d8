"""The one training loop, for pretraining and fine-tuning alike, and what it delegates "when" to.

    for each step: micro-batches -> TrainStep (eager or CUDA-graph replay; no host sync)
                   every log_every steps: read the device metrics (the one sync), log (metrics.jsonl, TensorBoard,
                   progress bar: loss, lr, samples/s, MFU, memory)
                   every checkpoint_every steps, at the end, and on SIGTERM/SIGINT: checkpoint (atomic, rank 0)

`Run` holds what the loop needs; the entry points (engine/pretrain.py, engine/finetune.py) build it from their
configs. Resuming: `restore_training_state` loads a checkpoint written by `Run.save`, so a run killed at any point
continues with the same weights, optimizer state, RNG streams and data position. The samples the readers skipped
(on_error=skip; mmfuse_fast.data.skipped_count) are summed over ranks and logged as `skipped_samples`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmfuse_fast.config import OptimConfig, TrainConfig, load_config
from mmfuse_fast.data import skipped_count
from mmfuse_fast.engine.checkpoint import (LoadedCheckpoint, apply_weights, config_differences, config_hash,
                                           hashed_config_values, rng_state, save_checkpoint, set_rng_state)
from mmfuse_fast.engine.distributed import DistInfo, broadcast_flag
from mmfuse_fast.engine.logging import MetricLogger
from mmfuse_fast.engine.observe import TensorBoardWriter, ThroughputMeter, peak_tflops
from mmfuse_fast.engine.rundir import CONFIG_NAME
from mmfuse_fast.engine.schedule import lr_at
from mmfuse_fast.engine.step import TrainStep, nvtx_range
from mmfuse_fast.errors import ConfigError

__all__ = ["Run", "run_loop", "StopSignal", "training_state", "restore_training_state"]


def training_state(step: int, optimizer_state: dict, samples_seen: int, cfg_hash: str,
                   generators: dict[str, torch.Generator], config_values: dict | None = None) -> dict:
    """What besides the weights a run needs to continue exactly: plain values and tensors only. `config_values`
    (engine.checkpoint.hashed_config_values) let a refused resume name the keys that changed."""
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "samples_seen": samples_seen,
        "config_hash": cfg_hash,
        "rng": rng_state(generators),
    }
    if config_values is not None:
        state["config"] = config_values
    return state


def restore_training_state(ckpt: LoadedCheckpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           config, generators: dict[str, torch.Generator], fsdp: bool = False) -> dict:
    """Loads a checkpoint (read by engine.checkpoint.read_newest_checkpoint) into the model, the optimizer and
    the generators; refuses one written with another `config` (this run's), naming the keys that differ."""
    state = ckpt.state
    if state.get("config_hash") != config_hash(config):
        changed = config_differences(_checkpoint_config_values(ckpt, type(config)), hashed_config_values(config))
        what = "; ".join(changed) if changed else f"hash {state.get('config_hash')} vs {config_hash(config)}"
        raise ConfigError(f"cannot resume from {ckpt.path}: the config differs from the checkpoint's ({what}); "
                          f"only train.steps, log/checkpoint intervals, device, data.root and data.num_workers may "
                          f"change on resume (start another run directory for another config)")
    if fsdp:  # full (gathered) state dicts, loaded into the sharded model and optimizer
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ckpt.weights, options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    else:
        apply_weights(model, ckpt.weights, ckpt.path)
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], generators)
    return state


def _checkpoint_config_values(ckpt: LoadedCheckpoint, config_class) -> dict:
    """The hashed config values a checkpoint was written with: stored in it, or (checkpoints from before they were)
    the run directory's config.yaml, which a resumed run rewrites only once its config is accepted."""
    if isinstance(ckpt.state.get("config"), dict):
        return ckpt.state["config"]
    try:
        return hashed_config_values(load_config(config_class, ckpt.path.parent.parent / CONFIG_NAME))
    except Exception:  # an unreadable or outdated config.yaml: the error falls back to the hashes
        return {}


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


@dataclass
class Run:
    """Everything the loop touches. `model` is the unwrapped module whose weights are checkpointed."""

    run_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: TrainStep
    batches: Iterator[dict]  # this rank's micro-batches, grad_accum_steps per step
    train: TrainConfig
    optim_cfg: OptimConfig
    cfg_hash: str
    desc: str
    config_values: dict | None = None  # engine.checkpoint.hashed_config_values of the run's config
    train_set: Dataset | None = None  # what the loader reads: its readers' skipped samples are reported
    start_step: int = 0
    last_checkpoint: Path | None = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    info: DistInfo = field(default_factory=DistInfo)
    fsdp: bool = False
    flops_per_sample: float | None = None
    progress: bool = True

    def save(self, step: int) -> Path | None:
        """A checkpoint of `step` (rank 0 writes; every rank takes part when sharded). Never after max_bad_steps
        non-finite steps: the weights would be the last finite ones but the run has failed."""
        group = self.info.group if self.info.enabled else None
        self.step_fn.check(group)
        model_state = None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=opts)
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        else:
            optim_state = self.optimizer.state_dict()
        path = None
        if self.info.is_main:
            state = training_state(step, optim_state, step * self.train.batch_size, self.cfg_hash, self.generators,
                                   self.config_values)
            state["engine"] = self.step_fn.state_dict()
            path = save_checkpoint(self.run_dir, step, self.model, state, model_state=model_state)
        if self.info.enabled:
            import torch.distributed as dist

            dist.barrier(group=self.info.cpu_group)
        return path


def run_loop(run: Run) -> dict:
    """Trains from `run.start_step` to `run.train.steps`; returns the summary (run_dir, step, last metrics,
    checkpoint, wall time, and `interrupted` / `exit_code` when a signal stopped it)."""
    t_start = time.perf_counter()
    tc, info, step_fn = run.train, run.info, run.step_fn
    steps, step = tc.steps, run.start_step
    device = step_fn.device
    group = info.group if info.enabled else None
    meter = ThroughputMeter(device, tc.batch_size, run.flops_per_sample, peak_tflops(device, step_fn.amp_dtype))
    tb = TensorBoardWriter(run.run_dir, enabled=info.is_main)  # before the progress bar: it may print a note
    logger = MetricLogger(run.run_dir, total_steps=steps, start_step=step, desc=run.desc,
                          progress=run.progress) if info.is_main else None
    last_ckpt, interrupted = run.last_checkpoint, None
    counts_skips = skipped_count(run.train_set) is not None  # data that counts nothing gets no such field
    stop = StopSignal()
    stop.install()
    try:
        with logger if logger is not None else contextlib.nullcontext():
            while step < steps:
                meter.data_start()
                with nvtx_range("data"):
                    micro = [next(run.batches) for _ in range(step_fn.accum)]
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
                    record["lr"] = lr_at(step - 1, run.optim_cfg, steps)
                    record.update(meter.interval())
                    if counts_skips:
                        record["skipped_samples"] = _skipped_total(run.train_set, info)
                    if logger is not None:
                        logger.log(step, record)
                        tb.write(step, logger.last)
                if not info.enabled or log_now or ckpt_now:  # ranks agree on when to stop
                    if broadcast_flag(stop.signum is not None, info):
                        interrupted = signal.Signals(stop.signum).name if stop.signum else "SIGTERM"
                if ckpt_now or interrupted:
                    last_ckpt = run.save(step) or last_ckpt
                if interrupted:
                    break
            step_fn.check(group)
    finally:
        stop.uninstall()
        tb.close()

    out = {
        "run_dir": str(run.run_dir),
        "step": step,
        "metrics": logger.last if logger is not None else {},
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "wall_s": round(time.perf_counter() - t_start, 3),
        "rank": info.rank,
        "world_size": info.world,
    }
    if counts_skips:
        out["skipped_samples"] = _skipped_total(run.train_set, info)
    if interrupted:
        out["interrupted"] = interrupted
        out["exit_code"] = 128 + int(getattr(signal, interrupted))
    return out


def _skipped_total(train_set: Dataset, info: DistInfo) -> int:
    """The skipped samples of every rank (a host-side sum over ranks, no device sync; each rank's readers count
    their own, so a bad sample met by two ranks counts twice)."""
    total = skipped_count(train_set) or 0
    if not info.enabled:
        return total
    import torch.distributed as dist

    t = torch.tensor([total], dtype=torch.int64)
    dist.all_reduce(t, group=info.cpu_group)
    return int(t.item())
