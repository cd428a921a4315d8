"""MAE pieces shared by the masked-autoencoder models (the paper's model, Fus-MAE, SatViT): static-count random
masking, patchify, the masked-patch MSE and the per-modality decoder (as in MAE's `models_mae.py`).

Shapes: B batch, N patches, n = n_keep visible patches (static), D encoder width, Dd decoder width, p patch size,
C channels."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from mmfuse_fast.models.layers import Block, CrossBlock, sincos_pos_embed_2d


def random_masking(noise: torch.Tensor, n_keep: int):
    """MAE masking with a static kept count, from (B, N) uniform noise: (ids_keep (B, n), mask (B, N) 1 = masked,
    ids_restore (B, N))."""
    batch, n_tokens = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first n_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, n_tokens, device=noise.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return ids_shuffle[:, :n_keep], mask, ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, n) -> (B, n, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patch-major then (row, col, channel) inside a patch (as MAE)."""
    b, c, h, _ = imgs.shape
    p, g = patch_size, h // patch_size
    x = imgs.reshape(b, c, g, p, g, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, g * g, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W)."""
    b, n, _ = patches.shape
    p, g = patch_size, int(round(n**0.5))
    x = patches.reshape(b, g, g, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, g * p, g * p)


def normalize_patches(target: torch.Tensor) -> torch.Tensor:
    """MAE's per-patch normalized pixel target (norm_pix_loss)."""
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


def denormalize_patches(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A prediction in per-patch normalized units back to the units of `target` (for visualization)."""
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return pred * (var + 1e-6) ** 0.5 + mean


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over the masked patches: pred, target (B, N, p*p*C), mask (B, N) 1 = masked.

    `weight` (B,) scales each sample's patches (0 leaves a sample out); the denominator stays the static count of
    masked patches, so the loss is a plain mean over the global batch under data parallelism."""
    target = target.float()
    if norm_pix:
        target = normalize_patches(target)
    loss = ((pred.float() - target) ** 2).mean(-1)  # (B, N)
    if weight is None:
        return (loss * mask).sum() / mask.sum()
    return (loss * mask * weight[:, None]).sum() / mask.sum()


class MaskedDecoder(nn.Module):
    """One MAE decoder: visible tokens + mask tokens -> [cross-attention] -> blocks -> pixels.

    With `cross` its tokens cross-attend (one CrossBlock) to a memory of encoded token sets (the paper's CMF: all
    modalities; Fus-MAE: the other modalities); without it this is the plain MAE decoder."""

    def __init__(self, num_patches: int, grid_size: int, embed_dim: int, decoder_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, out_dim: int, cross: bool, backend: str,
                 qkv_bias: bool = True):
        super().__init__()
        self.num_patches = num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, grid_size)[None],
                             persistent=False)
        self.cmf = CrossBlock(decoder_dim, num_heads, mlp_ratio, backend=backend) if cross else None
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, backend, qkv_bias=qkv_bias)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, out_dim)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, context: torch.Tensor | None = None,
                context_segments: Sequence[int] = (), context_allow: torch.Tensor | None = None,
                context_used: torch.Tensor | None = None) -> torch.Tensor:
        """latent (B, n, D), ids_restore (B, N); context (B, sum L, Dd) in sets `context_segments`, of which the
        decoder sees those with context_allow[0, j] (default all) and, per sample, the first context_used[b, j]
        tokens. -> (B, N, p*p*C)."""
        b, n, _ = latent.shape
        x = self.decoder_embed(latent)  # (B, n, Dd)
        mask_tokens = self.mask_token.to(x.dtype).expand(b, self.num_patches - n, -1)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, N, Dd) in shuffled order
        x = gather_tokens(x, ids_restore) + self.decoder_pos_embed.to(x.dtype)  # (B, N, Dd) in patch order
        segments = [self.num_patches]
        if self.cmf is not None:
            x = self.cmf(x, context, segments, context_segments, context_allow, kv_used=context_used)
        for blk in self.blocks:
            x = blk(x, segments)
        return self.pred(self.norm(x))  # (B, N, p*p*C)
