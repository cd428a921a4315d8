"""Fus-MAE (Chan-To-Hing & Veeravalli, arXiv 2401.02764; no public code) as a configuration of the paper's model:
per-modality tokenizers, cross-attention early fusion in place of the first encoder block (one CAF block, no stem),
joint encoder blocks, one decoder per modality that cross-attends to the *other* modalities
(`decoder_context: others`), MAE loss, no contrastive term. Which details come from the paper and which could not
be verified: docs/baselines.md, "Fus-MAE"."""

from __future__ import annotations

from dataclasses import dataclass

from mmfuse_fast.config import ModelConfig, register_model_config
from mmfuse_fast.models.mmfuse import MMFuseMAE
from mmfuse_fast.models.registry import register_model


@register_model_config("fus_mae")
@dataclass
class FusMAEConfig(ModelConfig):
    """The paper's model's keys, with Fus-MAE's defaults."""

    name: str = "fus_mae"
    stem_depth: int = 0  # the fusion block is the first encoder block
    caf_depth: int = 1
    encoder_depth: int = 5
    contrastive: bool = False
    decoder_context: str = "others"


@register_model("fus_mae")
class FusMAE(MMFuseMAE):
    """MMFuseMAE built from a FusMAEConfig (the same stages; see the module docstring)."""
