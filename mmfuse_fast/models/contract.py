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
    model.missing_modality                          # what encode() does with the modalities left out:
        "drop"  per-modality token sets (the paper's model, Fus-MAE): only the chosen modalities' tokens are made,
                and encode() returns one token set per chosen modality, keyed by its name
        "zero"  one token set over the channel stack of all modalities (SatViT, DINO-MM): the missing modalities'
                channels are zero, the normalized band mean (DINO-MM zeroes a sensor too, in its own scaling where
                zero is the band's mean - 2 std: docs/baselines.md), and encode()
                returns the single set under the key STACK
    model.downstream_backbone()                     # optional: the module downstream tasks keep (default: the
                                                    # model itself), e.g. DINO-MM's teacher encoder alone

`token_sets(backbone, modalities)` names the keys encode() returns; `check_batch` validates a batch against a
backbone's bands and image size with an error that names the modality.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["PretrainModel", "Backbone", "check_pretrain_output", "check_batch", "token_sets", "STACK",
           "MISSING_MODALITY", "chosen_modalities", "downstream_backbone"]

STACK = "stack"  # the key of a channel-stack backbone's single token set
MISSING_MODALITY = ("drop", "zero")


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


def chosen_modalities(backbone, modalities: Sequence[str] | None) -> tuple[str, ...]:
    """`modalities` (default: all of the backbone's) as a tuple: a non-empty list of distinct modalities the
    backbone was built with, or a ValueError naming the ones it does not know."""
    chosen = tuple(backbone.modalities if modalities is None else modalities)
    unknown = [m for m in chosen if m not in backbone.modalities]
    if unknown:
        raise ValueError(f"unknown modality {', '.join(map(repr, unknown))}: this model was built (pretrained) on "
                         f"{list(backbone.modalities)}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"modalities must be a non-empty list of distinct names; got {list(chosen)}")
    return chosen


def token_sets(backbone, modalities: Sequence[str] | None = None) -> tuple[str, ...]:
    """The keys `backbone.encode(batch, modalities)` returns: the chosen modalities ("drop"), or STACK ("zero")."""
    chosen = chosen_modalities(backbone, modalities)
    return chosen if backbone.missing_modality == "drop" else (STACK,)


def downstream_backbone(model):
    """The module downstream tasks build on: `model.downstream_backbone()` where defined, else the model."""
    pick = getattr(model, "downstream_backbone", None)
    return pick() if callable(pick) else model


def check_batch(backbone, batch, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """{m: (B, C_m, H, W)} for the given modalities of `batch`, checked against `backbone.bands` and
    `backbone.img_size`, with an error naming the modality on anything missing or misshapen."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping modality -> (B, C, H, W) tensor; got {type(batch).__name__}")
    out, size = {}, backbone.img_size
    for m in modalities:
        if m not in backbone.bands:
            raise ValueError(f"unknown modality {m!r}; this model has {list(backbone.modalities)}")
        bands = backbone.bands[m]
        expected = f"(B, {len(bands)}, {size}, {size}) with bands {list(bands)}"
        if m not in batch:
            raise ValueError(f"batch is missing modality {m!r}: expected {expected}; got keys {list(batch)}")
        x = batch[m]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"batch[{m!r}] must be a float tensor {expected}; got {what}")
        if x.shape[1] != len(bands) or tuple(x.shape[2:]) != (size, size):
            raise ValueError(f"batch[{m!r}] must be {expected}; got shape {tuple(x.shape)}")
        out[m] = x
    sizes = {m: x.shape[0] for m, x in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"modalities have different batch sizes: {sizes}")
    return out
