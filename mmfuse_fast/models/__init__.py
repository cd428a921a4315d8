"""Models: shared layers, the paper's MMFuseMAE, the baselines (Fus-MAE, SatViT, DINO-MM), task heads, and a
registry of named models (`model.name`)."""

from mmfuse_fast.models.heads import MultiLabelClassifier
from mmfuse_fast.models.layers import (Attention, Block, CrossAttention, CrossBlock, Mlp, ModalityTokenizer,
                                       PatchEmbed, sincos_pos_embed_2d)
from mmfuse_fast.models.mmfuse import MMFuseMAE
from mmfuse_fast.models.dino_mm import DinoMM
from mmfuse_fast.models.fus_mae import FusMAE
from mmfuse_fast.models.registry import MODELS, build_model, register_model
from mmfuse_fast.models.satvit import SatViT
from mmfuse_fast.models.vit import StackViT

__all__ = [
    "MODELS", "build_model", "register_model", "MMFuseMAE", "FusMAE", "SatViT", "DinoMM", "StackViT",
    "MultiLabelClassifier",
    "PatchEmbed", "ModalityTokenizer", "Mlp", "Attention", "CrossAttention", "Block", "CrossBlock",
    "sincos_pos_embed_2d",
]
