"""The throughput-first training step: AMP, gradient accumulation, clipping, fused AdamW, non-finite skipping and
device-side metrics, eager or captured whole as one CUDA graph. It serves every model that fulfils the pretraining
contract (models/contract.py), and the fine-tuning task models (engine/tasks.py): it knows no loss term.

    step = TrainStep(net, optimizer, device=device, optim_cfg=cfg.optim, total_steps=n, model=model)
    out = step(micro_batches)        # a list of grad_accum_steps batches; no host sync
    metrics = step.read_metrics()    # every N steps: the one host sync; raises NonFiniteLossError after K bad steps

Everything that happens per step stays on the device, so the same Python function is both the eager step (CPU, or
CUDA without graphs) and the body captured once into a CUDA graph and replayed:

- the model returns `objective` (backpropagated) and its declared `metric_names` (summed on the device);
- the learning rate (and a weight-decay schedule) are 0-d device tensors computed from a device step counter
  (engine/schedule.py), and AdamW is `fused=True` (+ `capturable=True` on CUDA) with that tensor as its `lr`;
  param groups with an `lr_scale` (layer-wise lr decay, engine/optim.py) get their own 0-d device tensor, the
  scheduled lr times the scale, written in place inside the step;
- a step whose objective, metrics or gradient norm is not finite is skipped inside the fused optimizer (its
  `found_inf` input: no parameter, moment or step-count change) and counted; the run stops once `max_bad_steps`
  come in a row;
- the model's optional `after_optimizer_step(step, skipped)` hook runs next (an EMA teacher update);
- fp16 uses dynamic loss scaling with the same device ops as `torch.amp.GradScaler`
  (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`), fused into the step so it is capturable;
- metrics and gradient norm are summed into one device tensor and read every N steps (`read_metrics`).

CUDA graphs: the first call copies the batch into static device buffers, runs a few warmup steps on a side stream
(to initialise optimizer state, autotuning and compiled code), restores every tensor of the model (parameters and
buffers: an EMA teacher, BatchNorm statistics), the optimizer state, the counters and the mask/crop generator to
their state before warmup, then captures the step. Later calls copy the next batch into the static buffers
(non-blocking, from pinned memory) and replay. Numbers equal the eager step's.

A/B switch (module attribute, read when a TrainStep is built; default off):
    OVERLAP_INPUT_COPY = False | True     (environment: MMFUSE_OVERLAP_INPUT_COPY=1)
        True: in graph mode each batch is copied host -> device on a side stream into one of two staging buffers,
        so that the copy of batch N+1 runs while the replay of step N is still in flight; a device-to-device copy
        into the static inputs then precedes the replay. Off: the copy into the static inputs waits for the
        previous replay. No effect on the eager step (CPU, or CUDA without graphs). Same numbers either way.

`forbid_host_sync()` is a dispatch mode that raises on any op that makes the host wait for a tensor's value (`.item()`,
`bool(t)`, `.tolist()` of a device tensor, `.cpu()` of a device tensor, `nonzero`, ...): tests run the step under it
on the CPU, where a CUDA graph cannot check for us.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmfuse_fast.config import OptimConfig
from mmfuse_fast.engine.distributed import unwrap_model
from mmfuse_fast.engine.schedule import cosine_schedule, lr_tensor
from mmfuse_fast.errors import NonFiniteLossError
from mmfuse_fast.models.contract import check_pretrain_output

__all__ = ["TrainStep", "HostSyncError", "forbid_host_sync", "resolve_amp", "nvtx_range"]

OVERLAP_INPUT_COPY = os.environ.get("MMFUSE_OVERLAP_INPUT_COPY", "0") == "1"

# Flags after the metric sums in the device accumulator (float64).
_FLAGS = ("good", "bad", "streak", "trip", "streak_start", "overflow")


# --- host-sync detection -----------------------------------------------------------------------------------------


class HostSyncError(RuntimeError):
    """An op inside the training step made the host wait for a tensor value."""


_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique",
             "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount"}
# Validation that exists only on the CPU (on CUDA the same code uses torch._assert_async): allowed for CPU tensors.
CPU_ONLY_SYNC_SITES = (("mmfuse_fast/ops/crop_resize.py", "_check"),)


def _cpu_only_site() -> bool:
    f = sys._getframe(2)
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        if any(path.endswith(file) and f.f_code.co_name == fn for file, fn in CPU_ONLY_SYNC_SITES):
            return True
        f = f.f_back
    return False


class forbid_host_sync(TorchDispatchMode):
    """Raises HostSyncError on ops that read a tensor's value on the host (or copy device -> CPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        sync = name in _SYNC_OPS
        if not sync and name in ("_to_copy", "copy_"):  # device -> host copies
            src = args[1] if name == "copy_" else args[0]
            dst_device = args[0].device if name == "copy_" else kwargs.get("device")
            sync = (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None
                    and torch.device(dst_device).type == "cpu")
        if sync:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if not (tensors and all(t.device.type == "cpu" for t in tensors) and _cpu_only_site()):
                raise HostSyncError(f"host synchronization inside the training step: aten.{name} "
                                    f"(a .item(), bool(tensor), .tolist(), .cpu() or data-dependent shape)")
        return func(*args, **kwargs)


# --- AMP, NVTX ----------------------------------------------------------------------------------------------------


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """"auto" -> bf16 on CUDA, none (fp32) on the CPU; "off" -> none."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range for Nsight Systems on CUDA; a no-op on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def clip_grad_norm_per_parameter_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clips each gradient to norm `max_norm` on its own (DINO's `clip_gradients`), on the device; returns the
    total norm before clipping (for the log and the non-finite check)."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)
    return torch.linalg.vector_norm(torch.stack(norms))


# --- the step ----------------------------------------------------------------------------------------------------


class TrainStep:
    """One optimizer step over `grad_accum_steps` micro-batches, eager or as a replayed CUDA graph.

    `net` may be wrapped (DDP, FSDP2, torch.compile); it is called as `net(batch, generator=generator,
    step=step_counter)` and returns the pretraining contract's dict (models/contract.py). `model` is the unwrapped
    model (default: `unwrap_model(net)`): its `metric_names`, `batch_keys`, optional `after_optimizer_step` hook and
    its tensors (for the CUDA-graph warmup restore)."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 optim_cfg: OptimConfig, total_steps: int, model: nn.Module | None = None, amp: str = "auto",
                 grad_accum_steps: int = 1, max_bad_steps: int = 10, cuda_graph: bool = False,
                 generator: torch.Generator | None = None, start_step: int = 0, no_sync=None,
                 graph_warmup: int = 3, batch_transform: Callable[[dict], dict] | None = None):
        self.net, self.optimizer, self.device = net, optimizer, device
        # device-side input work that belongs to the step (and its graph): e.g. engine/data.py's DeviceNormalize
        self.batch_transform = batch_transform
        self.model = model if model is not None else unwrap_model(net)
        self.optim_cfg, self.total_steps = optim_cfg, total_steps
        self.model_metric_names = tuple(self.model.metric_names)
        self.metric_names = self.model_metric_names + ("grad_norm",)
        self.batch_keys = tuple(getattr(self.model, "batch_keys", ()) or ())  # empty: every tensor of the batch
        self.after_optimizer_step = getattr(self.model, "after_optimizer_step", None)
        self.amp_dtype = resolve_amp(amp, device)
        self.accum = int(grad_accum_steps)
        self.max_bad_steps = int(max_bad_steps)
        self.generator = generator
        self.no_sync = no_sync  # DDP's no_sync for all but the last micro-batch
        self.use_graph = bool(cuda_graph) and device.type == "cuda"
        self.graph_warmup = graph_warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grad_clip = float(optim_cfg.grad_clip)
        self.clip_per_parameter = optim_cfg.grad_clip_mode == "per_parameter"
        # A weight-decay schedule is applied here (the optimizer's own decay is 0 then: see build_optimizer).
        decay_groups = ([g for g in optimizer.param_groups if g.get("name") == "decay"]
                        if optim_cfg.weight_decay_end is not None else [])
        self.decayed = [p for g in decay_groups for p in g["params"]]
        # {lr scale: parameters} of the decayed groups (layer-wise lr decay scales the decoupled decay too)
        self._decay_sets: dict[float, list[torch.Tensor]] = {}
        for g in decay_groups:
            self._decay_sets.setdefault(float(g.get("lr_scale", 1.0)), []).extend(g["params"])
        if hasattr(self.model, "set_total_steps"):
            self.model.set_total_steps(total_steps)

        n = len(self.metric_names)
        self._flag = {name: n + i for i, name in enumerate(_FLAGS)}
        f64 = dict(device=device, dtype=torch.float64)
        self.step_t = torch.full((), float(start_step), **f64)
        self.lr_t = torch.zeros((), device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
        self.acc = torch.zeros(n + len(_FLAGS), **f64)
        self.acc[self._flag["trip"]] = -1
        self.acc[self._flag["streak_start"]] = -1
        # One device tensor shared by every group, written inside the step; groups with an lr_scale != 1 (layer-wise
        # decay) get one tensor per distinct scale, the scheduled lr times the scale, written in the same step.
        scales = sorted({float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups} - {1.0})
        self.scaled_lrs = [torch.zeros_like(self.lr_t) for _ in scales]
        self.lr_scales_t = torch.tensor(scales, device=device, dtype=self.lr_t.dtype)
        lr_of_scale = dict(zip(scales, self.scaled_lrs))
        for g in optimizer.param_groups:
            g["lr"] = lr_of_scale.get(float(g.get("lr_scale", 1.0)), self.lr_t)
        # fp16: dynamic loss scale (GradScaler's defaults)
        self.fp16 = self.amp_dtype == torch.float16
        self.scale = torch.full((), 2.0**16, device=device, dtype=torch.float32) if self.fp16 else None
        self.growth_tracker = torch.zeros((), device=device, dtype=torch.int32) if self.fp16 else None
        self.static_batches: list[dict[str, torch.Tensor]] | None = None
        self.static_out: dict[str, torch.Tensor] | None = None
        self.overlap_input_copy = OVERLAP_INPUT_COPY
        self._staged_inputs: StagedInputCopy | None = None
        self._output_checked = False

    # ------------------------------------------------------------------------------------------------------------

    def set_step(self, step: int) -> None:
        self.step_t.fill_(float(step))

    def _streak_slots(self) -> list[int]:
        return [self._flag["streak"], self._flag["streak_start"]]

    def state_dict(self) -> dict:
        """What besides the optimizer must survive a resume (fp16 loss scale; the skip streak)."""
        out = {"acc_streak": self.acc[self._streak_slots()].cpu()}
        if self.fp16:
            out.update(scale=self.scale.cpu(), growth_tracker=self.growth_tracker.cpu())
        return out

    def load_state_dict(self, state: dict) -> None:
        if "acc_streak" in state:
            self.acc[self._streak_slots()] = state["acc_streak"].to(self.device)
        if self.fp16 and "scale" in state:
            self.scale.copy_(state["scale"])
            self.growth_tracker.copy_(state["growth_tracker"])

    # ------------------------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # cache off: the weight-cast cache must not outlive a captured graph
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, stacked metrics) of one micro-batch."""
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        with nvtx_range("forward"), self._autocast():
            out = self.net(batch, generator=self.generator, step=self.step_t)
        if not self._output_checked:
            check_pretrain_output(out, self.model_metric_names, type(self.model).__name__)
            self._output_checked = True
        metrics = torch.stack([out[name].detach().float() for name in self.model_metric_names])
        return out["objective"].float(), metrics

    def _body(self, micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The step as device ops only: the eager step, and what the CUDA graph captures."""
        lr = lr_tensor(self.step_t, self.optim_cfg, self.total_steps)
        self.lr_t.copy_(lr)
        if self.scaled_lrs:
            torch._foreach_copy_(self.scaled_lrs, list((self.lr_t * self.lr_scales_t).unbind(0)))
        self.optimizer.zero_grad(set_to_none=True)
        totals, objective_finite = None, None
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            sync_ctx = self.no_sync() if (self.no_sync is not None and i < n - 1) else contextlib.nullcontext()
            with sync_ctx:
                objective, metrics = self._forward(batch)
                if n > 1:
                    objective = objective / n
                finite = torch.isfinite(objective.detach())
                if self.fp16:
                    objective = objective * self.scale
                with nvtx_range("backward"):
                    objective.backward()
            totals = metrics if totals is None else totals + metrics
            objective_finite = finite if objective_finite is None else objective_finite & finite
        if n > 1:
            totals = totals / n

        with nvtx_range("optimizer"):
            grads = [p.grad for p in self.params if p.grad is not None]
            overflow = None
            if self.fp16:
                overflow = torch.zeros((), device=self.device, dtype=torch.float32)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, overflow, self.scale.reciprocal())
            if self.grad_clip > 0 and self.clip_per_parameter:
                grad_norm = clip_grad_norm_per_parameter_(grads, self.grad_clip)
            elif self.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            grad_norm = _full(grad_norm).float()
            bad = ~(torch.isfinite(totals).all() & objective_finite)
            if not self.fp16:  # (with fp16 a non-finite gradient is an overflow: skipped, not counted as bad)
                bad = bad | ~torch.isfinite(grad_norm)
            skip = bad if overflow is None else bad | (overflow > 0)
            if self.decayed:  # decoupled weight decay, scheduled; none on a skipped step (as fused AdamW skips)
                wd = cosine_schedule(self.step_t, self.optim_cfg.weight_decay, self.optim_cfg.weight_decay_end,
                                     self.total_steps)
                for scale, params in self._decay_sets.items():  # each group decays with its own (scaled) lr
                    factor = torch.where(skip, torch.ones_like(wd), 1.0 - (lr if scale == 1.0 else lr * scale) * wd)
                    with torch.no_grad():
                        torch._foreach_mul_(params, factor.to(params[0].dtype))
            self.optimizer.found_inf = skip.float()  # fused AdamW skips the update (and its step count)
            self.optimizer.step()
            if self.fp16:
                torch._amp_update_scale_(self.scale, self.growth_tracker, overflow, 2.0, 0.5, 2000)
        if self.after_optimizer_step is not None:
            with nvtx_range("after_optimizer_step"):
                self.after_optimizer_step(self.step_t, skip)

        # device-side metrics
        flag = self._flag
        badf = bad.double()
        vals = torch.cat([totals.double(), grad_norm.double().reshape(1)])
        acc = self.acc
        streak_before = acc[flag["streak"]]
        streak = (streak_before + 1) * badf
        start = torch.where(bad & (streak_before == 0), self.step_t + 1, acc[flag["streak_start"]])
        trip = torch.where((streak >= self.max_bad_steps) & (acc[flag["trip"]] < 0), start, acc[flag["trip"]])
        new = torch.cat([
            acc[:flag["good"]] + torch.where(bad, torch.zeros_like(vals), vals),
            torch.stack([acc[flag["good"]] + 1 - badf, acc[flag["bad"]] + badf, streak, trip, start,
                         acc[flag["overflow"]] + (0.0 if overflow is None else (overflow > 0).double())]),
        ])
        acc.copy_(new)
        self.step_t.add_(1)
        out = {name: totals[i] for i, name in enumerate(self.model_metric_names)}
        out.update(grad_norm=grad_norm, skipped=skip, lr=lr)
        return out

    # ------------------------------------------------------------------------------------------------------------

    def _keys(self, batch: dict) -> tuple[str, ...]:
        return self.batch_keys or tuple(k for k, v in batch.items() if isinstance(v, torch.Tensor))

    def _to_device(self, batch: dict) -> dict:
        return {k: batch[k].to(self.device, non_blocking=True) for k in self._keys(batch)}

    def __call__(self, micro_batches: Sequence[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step over `micro_batches` (host or device tensors); returns device scalars (in graph mode:
        static tensors overwritten by the next step)."""
        if len(micro_batches) != self.accum:
            raise ValueError(f"expected {self.accum} micro-batches (train.grad_accum_steps), got {len(micro_batches)}")
        if not self.use_graph:
            return self._body([self._to_device(b) for b in micro_batches])
        if self.graph is None:
            self._capture(micro_batches)
        with nvtx_range("h2d"):
            if self._staged_inputs is not None:
                self._staged_inputs.load(micro_batches)
            else:
                for static, batch in zip(self.static_batches, micro_batches):
                    for k, buf in static.items():
                        buf.copy_(batch[k], non_blocking=True)
        with nvtx_range("step_graph"):
            self.graph.replay()
        return self.static_out

    # --- CUDA graph -------------------------------------------------------------------------------------------------

    def _model_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the model's state (parameters, then buffers), each once."""
        seen, out = set(), []
        for t in itertools.chain(self.model.parameters(), self.model.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def _snapshot(self) -> dict:
        opt_state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                     for p, s in self.optimizer.state.items()}
        return {
            "model": [t.detach().clone() for t in self._model_tensors()],
            "opt": opt_state,
            "tensors": [t.clone() for t in self._counters()],
            "gen": self.generator.get_state() if self.generator is not None else None,
        }

    def _counters(self) -> list[torch.Tensor]:
        out = [self.step_t, self.lr_t, self.acc, *self.scaled_lrs]
        if self.fp16:
            out += [self.scale, self.growth_tracker]
        return out

    @torch.no_grad()
    def _restore(self, snap: dict) -> None:
        for t, saved in zip(self._model_tensors(), snap["model"]):
            t.copy_(saved)
        for p, state in self.optimizer.state.items():
            saved = snap["opt"].get(p)
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if saved is None:
                    v.zero_()  # fresh state: AdamW's lazy initialisation is all zeros, step 0
                else:
                    v.copy_(saved[k])
        for t, saved in zip(self._counters(), snap["tensors"]):
            t.copy_(saved)
        if snap["gen"] is not None:
            self.generator.set_state(snap["gen"])

    def _capture(self, micro_batches: Sequence[dict]) -> None:
        self.static_batches = [{k: torch.empty_like(b[k], device=self.device) for k in self._keys(b)}
                               for b in micro_batches]
        for static, batch in zip(self.static_batches, micro_batches):
            for k, buf in static.items():
                buf.copy_(batch[k])
        if self.overlap_input_copy:
            self._staged_inputs = StagedInputCopy(self.static_batches, self.device)
        snap = self._snapshot()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.graph_warmup):
                self._body(self.static_batches)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self._restore(snap)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self.static_out = self._body(self.static_batches)
        self.graph = graph

    # --- metrics ----------------------------------------------------------------------------------------------------

    def check(self, group=None) -> None:
        """Raises NonFiniteLossError once max_bad_steps non-finite steps came in a row (one host sync)."""
        trip = self.acc[self._flag["trip"]].clone()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(trip, op=dist.ReduceOp.MAX, group=group)
        self._raise_if_tripped(int(trip))

    def _raise_if_tripped(self, trip: int) -> None:
        if trip >= 0:
            raise NonFiniteLossError(
                f"loss is not finite (NaN or inf) at step {trip} and stayed so for {self.max_bad_steps} step(s) in a "
                f"row (train.max_bad_steps; those steps were skipped, the weights are the last finite ones); lower "
                f"the learning rate, check the input data normalization, or enable gradient clipping"
            )

    def read_metrics(self, group=None) -> dict:
        """Means over the good steps since the last read (averaged over ranks with `group`), the skipped-step
        count, and the error check. The one host sync of the loop; a collective when distributed."""
        flag = self._flag
        acc = self.acc.clone()
        if group is not None:
            import torch.distributed as dist

            sums = acc[:flag["bad"] + 1].contiguous()
            dist.all_reduce(sums, group=group)
            flags = acc[flag["bad"] + 1:].contiguous()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            world = dist.get_world_size(group)
            acc = torch.cat([sums / world, flags])
        values = acc.tolist()
        self.acc[:flag["bad"] + 1].zero_()
        self.acc[flag["overflow"]].zero_()
        good, bad = values[flag["good"]], values[flag["bad"]]
        record = {}
        if good > 0:
            record.update({n: values[i] / good for i, n in enumerate(self.metric_names)})
        record["skipped_steps"] = int(round(bad))
        if self.fp16:
            record["overflow_steps"] = int(round(values[flag["overflow"]]))
            record["loss_scale"] = float(self.scale)
        self._raise_if_tripped(int(values[flag["trip"]]))
        return record


class StagedInputCopy:
    """Fills a CUDA graph's static input buffers from host batches through two staging buffers on the device.

    `load(micro_batches)` copies host tensors into the next staging buffer on a side stream (so it runs while the
    graph replay already queued on the current stream is still in flight), makes the current stream wait for that
    copy only, then copies staging -> static on the current stream, after the previous replay has read the static
    buffers. A staging buffer is rewritten only once the current stream has consumed its previous contents (an
    event per buffer). Device tensors in a batch are copied into the static buffers directly, on the current
    stream, as the plain path does. On a device without streams (the CPU) every copy is a plain copy."""

    def __init__(self, static_batches: list[dict[str, torch.Tensor]], device: torch.device):
        self.static = static_batches
        self.device = device
        self.staging = [[{k: torch.empty_like(buf) for k, buf in static.items()} for static in static_batches]
                        for _ in range(2)]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.consumed: list = [None, None]  # per staging buffer: an event after its last staging -> static copy
        self.next_slot = 0

    def load(self, micro_batches: Sequence[dict]) -> None:
        slot, self.next_slot = self.next_slot, 1 - self.next_slot
        staging = self.staging[slot]
        if self.stream is None:
            self._stage(staging, micro_batches)
        else:
            current = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.stream):
                if self.consumed[slot] is not None:
                    self.stream.wait_event(self.consumed[slot])
                self._stage(staging, micro_batches)
            current.wait_stream(self.stream)
        for static, stage, batch in zip(self.static, staging, micro_batches):
            for k, buf in static.items():
                src = batch[k]
                buf.copy_(stage[k] if src.device.type == "cpu" else src, non_blocking=True)
        if self.stream is not None:
            self.consumed[slot] = torch.cuda.current_stream(self.device).record_event()

    @staticmethod
    def _stage(staging: list[dict[str, torch.Tensor]], micro_batches: Sequence[dict]) -> None:
        for stage, batch in zip(staging, micro_batches):
            for k, buf in stage.items():
                if batch[k].device.type == "cpu":
                    buf.copy_(batch[k], non_blocking=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 gradient norm) as a plain replicated tensor."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t
