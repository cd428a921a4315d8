"""What the engine asks of a model: the pretraining contract and the backbone contract (docs/architecture.md,
Models). Every registered model fulfils both; the engine and the downstream tasks use nothing else of it.

Pretraining (engine/step.py's TrainStep):

    out = model(batch, generator=g, step=step_t)   # batch: {name: (B, ...) tensor} for name in model.batch_keys
    out["objective"]                                # 0-d: what backward() runs on, already scaled for data
                                                    # parallelism (the model knows which terms use global negatives)
    out[name] for name in model.metric_names        # 0-d metric tensors, summed on the device, read every N steps
    model.after_optimizer_step(step_t, skipped)     # optional: runs after the optimizer inside the same step (and
                                                    # the same CUDA graph), e.g. an EMA teacher update

`step_t` is the device step counter (float64 0-d, the 0-based index of this update) and `skipped` a 0-d bool,
true when the step was skipped (non-finite loss or gradient): hooks must not read either on the host. Schedules
that change per step (teacher temperature, momentum) are computed from `step_t` with engine/schedule.py. A model
that needs the run's length defines `set_total_steps(n)`, called once before training. A model with global-batch
terms (contrastive negatives, DINO centering) defines `set_data_parallel_group(group)`: the engine hands it the
data-parallel process group (None for one process) before training.

Backbone (downstream heads, segmentation, prediction):

    model.embed_dim, model.modalities, model.bands, model.img_size, model.patch_size
    model.encode(batch, modalities)                 # {m: (B, N, D)} for the chosen modalities
    model.forward_intermediates(batch, modalities, indices)
                                                    # [{m: (B, N, D)}] at the given feature levels
    model.feature_levels                            # how many levels forward_intermediates has (last = encode)
    model.missing_modality                          # "drop": any non-empty subset of the modalities may be
                                                    # encoded, the others are left out
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["PretrainModel", "Backbone", "check_pretrain_output"]


@runtime_checkable
class PretrainModel(Protocol):
    metric_names: tuple[str, ...]
    batch_keys: tuple[str, ...]

    def __call__(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                 step: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Backbone(Protocol):
    embed_dim: int
    modalities: tuple[str, ...]
    bands: dict[str, tuple[str, ...]]
    img_size: int
    patch_size: int
    feature_levels: int
    missing_modality: str

    def encode(self, batch: Mapping[str, torch.Tensor],
               modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]: ...

    def forward_intermediates(self, batch: Mapping[str, torch.Tensor], modalities: Sequence[str] | None = None,
                              indices: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]: ...


def check_pretrain_output(out: Mapping, metric_names: Sequence[str], model_name: str) -> None:
    """A clear error when a model's forward breaks the pretraining contract (checked once, while tracing)."""
    missing = [k for k in ("objective", *metric_names) if k not in out]
    if missing:
        raise TypeError(f"{model_name}.forward must return 'objective' and its metric_names {list(metric_names)}; "
                        f"missing {missing}")
