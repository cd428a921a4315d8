"""SatViT (Fuller et al., IEEE GRSL 2022; antofuller/SatViT): a masked autoencoder over the channel stack of all
modalities. Sources and our choices: docs/baselines.md, "SatViT".

Shapes: B batch, C = sum C_m stacked channels, N = (img_size / patch_size)**2 patches, n = n_keep visible patches
(static), D encoder width, Dd decoder width, p patch size.

    forward(batch)
      stack + embed   {m: (B, C_m, H, W)} -> (B, C, H, W) -> (B, N, D)   one projection of all bands + sin-cos pos
      mask            -> (B, n, D), mask (B, N)                           75 %, per sample, static n
      encode          ViT blocks (pre-norm, no qkv bias) -> norm: (B, n, D)   no CLS token
      decode          visible + mask tokens (B, N, Dd) -> blocks -> head: (B, N, p*p*C)
      loss            MSE on the masked patches, per-patch normalized target over all bands together
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from mmfuse_fast.config import BaseModelConfig, register_model_config, require, require_masks_some_keeps_some
from mmfuse_fast.models.contract import check_batch
from mmfuse_fast.models.draws import GlobalBatchDraws
from mmfuse_fast.models.layers import block_flops, init_weights, set_backend
from mmfuse_fast.models.mae import MaskedDecoder, gather_tokens, masked_mse, patchify, random_masking
from mmfuse_fast.models.registry import register_model
from mmfuse_fast.models.vit import StackViT


@register_model_config("satvit")
@dataclass
class SatViTConfig(BaseModelConfig):
    """SatViT (mmfuse_fast/models/satvit.py)."""

    name: str = "satvit"
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = False  # SatViT's attention has no qkv bias
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # hard-coded in SatViT

    def __post_init__(self):
        super().__post_init__()
        require(self.depth >= 1, "model.depth", f"must be >= 1; got {self.depth}")
        require(self.num_heads >= 1 and self.embed_dim % self.num_heads == 0, "model.num_heads",
                f"must be >= 1 and divide embed_dim={self.embed_dim}; got {self.num_heads}")
        require(self.decoder_depth >= 0, "model.decoder_depth", f"must be >= 0; got {self.decoder_depth}")
        require(self.decoder_dim >= 1, "model.decoder_dim", f"must be >= 1; got {self.decoder_dim}")
        require(self.decoder_heads >= 1 and self.decoder_dim % self.decoder_heads == 0, "model.decoder_heads",
                f"must be >= 1 and divide decoder_dim={self.decoder_dim}; got {self.decoder_heads}")
        require(self.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0; got {self.mlp_ratio}")
        require_masks_some_keeps_some(self.mask_ratio, (self.img_size // self.patch_size) ** 2, "model.mask_ratio")


@register_model("satvit")
class SatViT(GlobalBatchDraws, nn.Module):
    """The pretraining contract over the stages above; the backbone contract through its encoder (a StackViT:
    missing_modality "zero", a missing modality's channels are zero)."""

    metric_names = ("loss",)
    missing_modality = "zero"

    def __init__(self, cfg: SatViTConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = StackViT(cfg.modalities, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth,
                                cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, cls_token=False,
                                backend=cfg.ops_backend)
        self.modalities, self.bands = self.encoder.modalities, self.encoder.bands
        self.img_size, self.patch_size, self.embed_dim = cfg.img_size, cfg.patch_size, cfg.embed_dim
        self.num_patches = self.encoder.num_patches
        self.n_keep = int(self.num_patches * (1 - cfg.mask_ratio))
        self.decoder = MaskedDecoder(self.num_patches, self.encoder.grid_size, cfg.embed_dim, cfg.decoder_dim,
                                     cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio,
                                     cfg.patch_size**2 * self.encoder.in_chans, cross=False,
                                     backend=cfg.ops_backend, qkv_bias=cfg.qkv_bias)
        init_weights(self.decoder)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.modalities

    @property
    def feature_levels(self) -> int:
        return self.encoder.feature_levels

    def set_backend(self, backend: str) -> None:
        set_backend(self, backend)
        self.cfg.ops_backend = backend

    def downstream_backbone(self) -> StackViT:
        """The encoder alone (the decoder only serves pretraining)."""
        return self.encoder

    @torch.compiler.disable  # dynamo cannot trace a draw from an explicit torch.Generator: one break, up front
    def draw_noise(self, batch: int, device, generator=None) -> torch.Tensor:
        """(B, N) masking noise, drawn for the global batch and sliced to this rank's rows (models/draws.py)."""
        return self.draw_uniform(batch, self.num_patches, device=device, generator=generator)

    def forward(self, batch, generator: torch.Generator | None = None, step: torch.Tensor | None = None) -> dict:
        """{"objective", "loss", "pred" (B, N, p*p*C), "mask" (B, N)}; the loss is a per-sample mean, so under
        data parallelism the averaged gradient is the global batch's."""
        any_x = next(iter(check_batch(self, batch, self.modalities).values()))
        noise = self.draw_noise(any_x.shape[0], any_x.device, generator)  # first: the rest is one graph
        imgs = self.encoder.stack(batch)  # (B, C, H, W), all modalities
        tokens = self.encoder.embed(imgs)  # (B, N, D)
        ids_keep, mask, ids_restore = random_masking(noise, self.n_keep)
        latent = self.encoder.encode_tokens(gather_tokens(tokens, ids_keep))  # (B, n, D)
        pred = self.decoder(latent, ids_restore)  # (B, N, p*p*C)
        loss = masked_mse(pred, patchify(imgs, self.patch_size), mask, self.cfg.norm_pix_loss)
        return {"objective": loss, "loss": loss, "pred": pred, "mask": mask}

    # --- backbone contract (the encoder's) -----------------------------------------------------------------------

    def encode(self, batch, modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.encoder.encode(batch, modalities)

    def forward_intermediates(self, batch, modalities: Sequence[str] | None = None,
                              indices: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
        return self.encoder.forward_intermediates(batch, modalities, indices)

    def flops_per_sample(self, training: bool = True) -> float:
        """Analytic matmul FLOPs of one pretraining sample (x3 for forward + backward), as MMFuseMAE counts."""
        cfg = self.cfg
        n_tok, n, dd = self.num_patches, self.n_keep, cfg.decoder_dim
        total = self.encoder.flops(n, image_tokens=n_tok)
        total += 2 * n * cfg.embed_dim * dd  # decoder_embed
        total += cfg.decoder_depth * block_flops(n_tok, n_tok * n_tok, dd, int(dd * cfg.mlp_ratio))
        total += 2 * n_tok * dd * cfg.patch_size**2 * self.encoder.in_chans
        return float(total * (3 if training else 1))
