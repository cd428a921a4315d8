"""A ViT over the channel stack of all modalities: the encoder of the channel-stack baselines (SatViT, DINO-MM).

    stack      {m: (B, C_m, H, W)} -> (B, C, H, W), C = sum C_m in model order; a missing modality's channels are
               zero (the normalized band mean)
    embed      one patch projection of all C channels + fixed 2-D sin-cos positions [+ CLS token]: (B, [1+]N, D)
    blocks     pre-norm ViT blocks over one token set -> norm

It fulfils the backbone contract (models/contract.py) with missing_modality "zero": encode() returns the patch
tokens (CLS left out, so every backbone hands the heads the same (B, N, D) grid) under the key STACK.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfuse_fast.models.contract import STACK, check_batch, chosen_modalities
from mmfuse_fast.models.layers import Block, PatchEmbed, block_flops, init_weights, set_backend, sincos_pos_embed_2d


class StackViT(nn.Module):
    missing_modality = "zero"

    def __init__(self, bands: dict[str, Sequence[str]], img_size: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, cls_token: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.bands = {m: tuple(b) for m, b in bands.items()}
        self.modalities = tuple(self.bands)
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.in_chans = sum(len(b) for b in self.bands.values())
        self.patch_embed = PatchEmbed(img_size, patch_size, self.in_chans, embed_dim)
        self.grid_size, self.num_patches = self.patch_embed.grid_size, self.patch_embed.num_patches
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid_size)[None], persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, backend, qkv_bias=qkv_bias)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp_hidden = int(embed_dim * mlp_ratio)
        init_weights(self)
        w = self.patch_embed.proj.weight.data  # MAE: initialize the projection like a Linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    @property
    def feature_levels(self) -> int:
        """Levels of forward_intermediates: the embedded tokens, then the output of each block."""
        return len(self.blocks) + 1

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def set_backend(self, backend: str) -> None:
        set_backend(self, backend)

    # ----------------------------------------------------------------------------------------------------------

    def stack(self, batch, modalities: Sequence[str] | None = None) -> torch.Tensor:
        """{m: (B, C_m, H, W)} -> (B, C, H, W) with zeros for the modalities not chosen."""
        chosen = chosen_modalities(self, modalities)
        imgs = check_batch(self, batch, chosen)
        any_x = next(iter(imgs.values()))
        b, _, h, w = any_x.shape
        parts = [imgs[m] if m in imgs else any_x.new_zeros(b, len(bands), h, w) for m, bands in self.bands.items()]
        return torch.cat(parts, dim=1)

    def pos_embed_for(self, grid: int) -> torch.Tensor:
        """(1, grid**2, D) positions for a grid x grid patch grid: the fixed sin-cos grid, bicubically resampled
        when the input is smaller (DINO's local crops), as DINO interpolates its position embedding."""
        if grid == self.grid_size:
            return self.pos_embed
        g, d = self.grid_size, self.embed_dim
        pos = self.pos_embed.reshape(1, g, g, d).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, d)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, N', D) patch tokens with positions (h = w, any multiple of the patch size)."""
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N', D)
        grid = x.shape[-1] // self.patch_size
        return tokens + self.pos_embed_for(grid).to(tokens.dtype)

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, 1 + L, D) with the CLS token first (no position, as in MAE/DINO's learned zero)."""
        if self.cls_token is None:
            return tokens
        return torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def encode_tokens(self, x: torch.Tensor, levels: Sequence[int] = ()) -> torch.Tensor | list[torch.Tensor]:
        """Blocks -> norm over one token set (B, L, D); with `levels` (indices into [embedded, block 1, ...,
        block depth]) those levels in the order given, the last one normalized."""
        segments = [x.shape[1]]
        taken = {0: x}
        for i, blk in enumerate(self.blocks, 1):
            x = blk(x, segments)
            taken[i] = x
        if not levels:
            return self.norm(x)
        last = len(self.blocks)
        taken[last] = self.norm(taken[last])
        return [taken[i] for i in levels]

    # --- backbone contract --------------------------------------------------------------------------------------

    def encode(self, batch, modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{STACK: (B, N, D)}: the encoded patch tokens of the chosen modalities, the others zeroed."""
        x = self.encode_tokens(self.with_cls(self.embed(self.stack(batch, modalities))))
        return {STACK: x[:, self.num_prefix_tokens:]}

    def forward_intermediates(self, batch, modalities: Sequence[str] | None = None,
                              indices: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """[{STACK: (B, N, D)}] patch tokens at feature levels `indices` (default all; the last = encode's)."""
        indices = list(range(self.feature_levels)) if indices is None else [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.feature_levels]
        if bad or not indices:
            raise ValueError(f"feature levels {indices} must be a non-empty list in [0, {self.feature_levels})")
        x = self.with_cls(self.embed(self.stack(batch, modalities)))
        return [{STACK: t[:, self.num_prefix_tokens:]} for t in self.encode_tokens(x, levels=indices)]

    def flops(self, n_tokens: int, image_tokens: int | None = None) -> int:
        """Forward matmul FLOPs of embedding `image_tokens` patches (default: n_tokens) and running the blocks
        over `n_tokens` tokens."""
        image_tokens = n_tokens if image_tokens is None else image_tokens
        embed = 2 * image_tokens * self.in_chans * self.patch_size**2 * self.embed_dim
        return embed + len(self.blocks) * block_flops(n_tokens, n_tokens * n_tokens, self.embed_dim, self.mlp_hidden)
