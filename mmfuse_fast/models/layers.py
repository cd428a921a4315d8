"""Building blocks shared by the models: patch embedding, fixed positions, attention blocks.

Every attention here goes through `mmfuse_fast.ops.modality_attention`: a token sequence is a concatenation of
token *sets* (one per modality), described by static `segments` (the size of each set) and a set-level `allow`
matrix. The concrete backend ("auto" | "triton" | "reference") is a plain attribute, not a parameter, so the
state_dict is the same whatever the backend. Parameter names follow timm (`norm1`, `attn.qkv`, `mlp.fc1`, ...).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from mmfuse_fast import ops


# --------------------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) fixed 2-D sin-cos embedding, row-major over the patch grid (as in MAE)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dimension divisible by 4; got {dim}")
    ys, xs = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                         indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, ys), _sincos_1d(dim // 2, xs)], axis=1)
    return torch.from_numpy(emb).float()


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with a stride-`patch_size` convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, g, g) -> (B, N, D)


class ModalityTokenizer(nn.Module):
    """One modality's tokens: patch embedding + fixed 2-D sin-cos positions + a learned modality embedding."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.modality_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.patch_embed.grid_size)[None],
                             persistent=False)
        nn.init.normal_(self.modality_embed, std=0.02)
        w = self.patch_embed.proj.weight.data  # MAE: initialize the conv like a Linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x) + self.pos_embed.to(x.dtype) + self.modality_embed  # (B, N, D)


# --------------------------------------------------------------------------------------------------------------
# Attention blocks
# --------------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, l, d = x.shape
    return x.view(b, l, num_heads, d // num_heads).transpose(1, 2)  # (B, H, L, Dh)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, l, dh = x.shape
    return x.transpose(1, 2).reshape(b, l, h * dh)  # (B, L, D)


class Attention(nn.Module):
    """Self-attention over a concatenation of token sets; set i sees set j where allow[i, j]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segments: Sequence[int], allow: torch.Tensor | None = None,
                used: torch.Tensor | None = None) -> torch.Tensor:
        b, l, d = x.shape
        qkv = self.qkv(x).view(b, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, L, Dh)
        out = ops.modality_attention(q, k, v, segments, segments, allow, q_used=used, kv_used=used,
                                     backend=self.backend)
        return self.proj(_merge(out))


class CrossAttention(nn.Module):
    """Queries from one token sequence, keys/values from another (both possibly concatenations of sets)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, qkv_bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.backend = num_heads, backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim or dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, q_segments: Sequence[int],
                kv_segments: Sequence[int], allow: torch.Tensor | None = None,
                kv_used: torch.Tensor | None = None) -> torch.Tensor:
        b, lk, _ = context.shape
        q = _heads(self.q(x), self.num_heads)  # (B, H, Lq, Dh)
        kv = self.kv(context).view(b, lk, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, H, Lk, Dh)
        out = ops.modality_attention(q, k, v, q_segments, kv_segments, allow, kv_used=kv_used,
                                     backend=self.backend)
        return self.proj(_merge(out))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (timm's DropPath): in training, each sample's residual branch `x` is zeroed with
    probability `rate` and the kept ones scaled by 1 / (1 - rate). The mask is a `torch.rand` on x's device from
    the default generator (no host sync; a CUDA graph replays it with fresh philox offsets). Identity (the same
    tensor, no op) when `rate` is 0 or not training."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep
    return x * (mask.to(x.dtype) / keep)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)), attention restricted by `allow`.

    `drop_path` (a plain float attribute, 0 by default: not in the state_dict) is the stochastic-depth rate of both
    residual branches in training mode (`set_drop_path`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto",
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor, segments: Sequence[int], allow: torch.Tensor | None = None,
                used: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), segments, allow, used), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: x + xattn(norm1(x), norm_kv(ctx)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, kv_dim: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim or dim)
        self.attn = CrossAttention(dim, num_heads, kv_dim=kv_dim, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, q_segments: Sequence[int],
                kv_segments: Sequence[int], allow: torch.Tensor | None = None,
                kv_used: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.norm_kv(context), q_segments, kv_segments, allow, kv_used)
        return x + self.mlp(self.norm2(x))


def block_flops(lq: int, pairs: int, dim: int, hidden: int, lk: int | None = None) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward of a (cross-)attention block: `lq` query tokens, `lk` key
    tokens (default lq), `pairs` allowed (query, key) pairs, MLP width `hidden`."""
    lk = lq if lk is None else lk
    linear = 2 * lq * dim * dim * 2 + 2 * lk * dim * dim * 2 + 2 * lq * dim * hidden * 2  # q, proj | kv | mlp
    return linear + 2 * 2 * pairs * dim


def set_backend(module: nn.Module, backend: str) -> None:
    """Points every attention of `module` at `backend`; parameters and state_dict are unchanged."""
    for m in module.modules():
        if isinstance(m, (Attention, CrossAttention)):
            m.backend = backend


# The attributes of a backbone that hold its encoder blocks, in the order the forward pass runs them: the paper's
# model (and Fus-MAE) `stem` (a ModuleDict of per-modality ModuleLists: parallel branches), `caf_blocks`, `blocks`;
# a StackViT (SatViT's encoder, DINO-MM's teacher encoder) `blocks`. Only the backbone's own attributes count, so
# a pretraining decoder's blocks (`decoders.<m>.blocks`) are not encoder layers.
ENCODER_BLOCK_CONTAINERS = ("stem", "caf_blocks", "blocks")


def encoder_layers(backbone: nn.Module) -> list[list[tuple[str, Block]]]:
    """The backbone's encoder blocks by depth: element d lists the (qualified name, Block) pairs at depth d + 1
    (its layer id). Parallel branches of one stage share a depth (the per-modality stem blocks of the same index),
    stages follow each other in ENCODER_BLOCK_CONTAINERS order. Empty for a module with none of those containers."""
    layers: list[list[tuple[str, Block]]] = []
    for attr in ENCODER_BLOCK_CONTAINERS:
        container = getattr(backbone, attr, None)
        if isinstance(container, nn.ModuleDict):
            branches = [(f"{attr}.{key}", blocks) for key, blocks in container.items()]
        elif isinstance(container, (nn.ModuleList, nn.Sequential)):
            branches = [(attr, container)]
        else:
            continue
        stage: list[list[tuple[str, Block]]] = []
        for prefix, blocks in branches:
            for i, blk in enumerate(blocks):
                if not isinstance(blk, Block):
                    raise TypeError(f"{type(backbone).__name__}.{prefix}[{i}] is a {type(blk).__name__}, not a Block")
                if i == len(stage):
                    stage.append([])
                stage[i].append((f"{prefix}.{i}", blk))
        layers += stage
    return layers


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth on the backbone's encoder blocks (`encoder_layers`), rising linearly over depth from 0 at
    the first layer to `rate` at the last (MAE/timm: linspace(0, rate, depth)); 0 switches it off. Parameters and
    state_dict are unchanged."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1); got {rate}")
    layers = encoder_layers(backbone)
    if rate > 0 and not layers:
        raise ValueError(f"{type(backbone).__name__} has no encoder blocks in {ENCODER_BLOCK_CONTAINERS}: cannot "
                         f"set a drop path rate")
    rates = torch.linspace(0.0, rate, len(layers)).tolist() if layers else []
    for layer, r in zip(layers, rates):
        for _, blk in layer:
            blk.drop_path = float(r)


def init_weights(module: nn.Module) -> None:
    """MAE initialization: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
