"""The paper's model: multimodal masked autoencoder with cross-attention fusion (CAF), cross-modality fusion
decoders (CMF) and a cross-scale contrastive loss (docs/method.md), in the style of MAE's `models_mae.py`.

Shapes: B batch, M modalities, N = (img_size / patch_size)**2 patches per modality, n = n_keep visible patches
per modality (static: int(N * (1 - mask_ratio))), D encoder width, Dd decoder width, P projection width.

    forward(batch)
      tokenize        {m: (B, C_m, H, W)} -> {m: (B, N, D)}        own PatchEmbed + sincos pos + modality embed
      mask            -> {m: (B, n, D)}, mask {m: (B, N)}           noise argsort + gather, static n
      encode_tokens   stem (per modality) -> CAF (allow ~eye(M)) -> encoder (allow all) -> norm: {m: (B, n, D)}
      decode          per modality: own tokens + mask tokens (B, N, Dd) x-attend to all modalities (B, M*n, Dd)
                      -> decoder blocks -> head: {m: (B, N, p*p*C_m)}
      loss            MSE on masked patches, mean over modalities  +  lambda * cross-scale InfoNCE
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfuse_fast import ops
from mmfuse_fast.models.layers import (Block, CrossBlock, ModalityTokenizer, init_weights, set_backend,
                                       sincos_pos_embed_2d)
from mmfuse_fast.models.registry import register_model


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


class MaskedDecoder(nn.Module):
    """One modality's decoder: visible tokens + mask tokens -> [CMF cross-attention] -> blocks -> pixels.

    With `cmf` its tokens cross-attend (one CrossBlock) to the encoded features of all modalities; without it this
    is the plain MAE decoder of that modality.
    """

    def __init__(self, num_patches: int, grid_size: int, embed_dim: int, decoder_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, out_dim: int, cmf: bool, backend: str):
        super().__init__()
        self.num_patches = num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, grid_size)[None],
                             persistent=False)
        self.cmf = CrossBlock(decoder_dim, num_heads, mlp_ratio, backend=backend) if cmf else None
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, out_dim)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, context: torch.Tensor | None = None,
                context_segments: Sequence[int] = ()) -> torch.Tensor:
        b, n, _ = latent.shape
        x = self.decoder_embed(latent)  # (B, n, Dd)
        mask_tokens = self.mask_token.to(x.dtype).expand(b, self.num_patches - n, -1)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, N, Dd) in shuffled order
        x = gather_tokens(x, ids_restore) + self.decoder_pos_embed.to(x.dtype)  # (B, N, Dd) in patch order
        segments = [self.num_patches]
        if self.cmf is not None:
            x = self.cmf(x, context, segments, context_segments)  # allow all: sees every modality
        for blk in self.blocks:
            x = blk(x, segments)
        return self.pred(self.norm(x))  # (B, N, p*p*C)


@register_model("mmfuse")
class MMFuseMAE(nn.Module):
    """The pretraining and backbone contracts of models/contract.py over the stages above."""

    metric_names = ("loss", "loss_rec", "loss_con")
    missing_modality = "drop"  # encode() takes any non-empty subset of the modalities (CAF then sees only those)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.modalities = tuple(cfg.modalities)
        self.bands = {m: tuple(b) for m, b in cfg.modalities.items()}
        if not self.modalities:
            raise ValueError("model.modalities is empty")
        if not 0 <= cfg.mask_ratio < 1:
            raise ValueError(f"model.mask_ratio must be in [0, 1); got {cfg.mask_ratio}")
        self.img_size, self.patch_size = cfg.img_size, cfg.patch_size
        self.grid_size = cfg.img_size // cfg.patch_size
        self.num_patches = self.grid_size**2
        self.n_keep = int(self.num_patches * (1 - cfg.mask_ratio))
        if self.n_keep < 1:
            raise ValueError(f"model.mask_ratio {cfg.mask_ratio} keeps no token of {self.num_patches}")
        d, dd, backend = cfg.embed_dim, cfg.decoder_dim, cfg.ops_backend

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio, backend) for _ in range(n))

        # --- encoder side
        self.tokenizers = nn.ModuleDict({m: ModalityTokenizer(cfg.img_size, cfg.patch_size, len(b), d)
                                         for m, b in self.bands.items()})
        self.stem = nn.ModuleDict({m: blocks(cfg.stem_depth) for m in self.modalities})
        self.caf_blocks = blocks(cfg.caf_depth) if cfg.caf else nn.ModuleList()
        self.blocks = blocks(cfg.encoder_depth)
        self.norm = nn.LayerNorm(d)
        # --- decoders
        if cfg.cmf:  # the CMF memory: every modality's encoded tokens in decoder width, tagged by modality
            self.cmf_embed = nn.Linear(d, dd)
            self.cmf_modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, dd))
                                                        for m in self.modalities})
        self.decoders = nn.ModuleDict({
            m: MaskedDecoder(self.num_patches, self.grid_size, d, dd, cfg.decoder_depth, cfg.decoder_heads,
                             cfg.mlp_ratio, cfg.patch_size**2 * len(b), cfg.cmf, backend)
            for m, b in self.bands.items()})
        # --- contrastive projection heads
        if cfg.contrastive:
            self.proj_heads = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.proj_dim))
                                             for m in self.modalities})
        # CAF: set i attends to every set j != i. A subset of k modalities uses the [:k, :k] view (= ~eye(k)).
        n_mod = len(self.modalities)
        self.register_buffer("caf_allow", ~torch.eye(n_mod, dtype=torch.bool), persistent=False)

        # Data parallelism (set by the engine): the process group of the global batch. Contrastive negatives come
        # from it, and masks and crop boxes are drawn for the global batch and sliced to this rank's rows, so the
        # run computes the same thing whatever the world size. Not part of the state_dict.
        self.contrastive_group = None

        init_weights(self)  # Linear/LayerNorm as MAE; the tokenizers initialize their own conv
        for p in [dec.mask_token for dec in self.decoders.values()]:
            nn.init.normal_(p, std=0.02)
        if cfg.cmf:
            for p in self.cmf_modality_embed.values():
                nn.init.normal_(p, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.modalities

    @property
    def feature_levels(self) -> int:
        """Levels of forward_intermediates: after the fusion stem (stem + CAF), then after each encoder block."""
        return len(self.blocks) + 1

    def set_data_parallel_group(self, group) -> None:
        """The engine's data-parallel process group (None: one process): the contrastive negatives come from it."""
        self.contrastive_group = group

    @property
    def contrastive_group(self):
        return self._contrastive_group

    @contrastive_group.setter
    def contrastive_group(self, group) -> None:
        self._contrastive_group = group
        self._shard = (0, 1)
        if group is not None:
            import torch.distributed as dist

            self._shard = (dist.get_rank(group), dist.get_world_size(group))

    def set_backend(self, backend: str) -> None:
        """Switches every attention to `backend` ("auto" | "triton" | "reference"); weights are unchanged."""
        set_backend(self, backend)
        self.cfg.ops_backend = backend

    # ----------------------------------------------------------------------------------------------------------
    # Input handling
    # ----------------------------------------------------------------------------------------------------------

    def check_batch(self, batch, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        """{m: (B, C_m, H, W)} for the requested modalities, with a clear error on anything missing or misshapen."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping modality -> (B, C, H, W) tensor; got {type(batch).__name__}")
        out, size = {}, self.img_size
        for m in modalities:
            if m not in self.bands:
                raise ValueError(f"unknown modality {m!r}; this model has {list(self.modalities)}")
            bands = self.bands[m]
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

    def patchify(self, m: str, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patch-major then (row, col, channel) inside a patch (as MAE)."""
        b, c, p, g = imgs.shape[0], len(self.bands[m]), self.patch_size, self.grid_size
        x = imgs.reshape(b, c, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, g * g, p * p * c)

    def unpatchify(self, m: str, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        b, c, p, g = patches.shape[0], len(self.bands[m]), self.patch_size, self.grid_size
        x = patches.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    # ----------------------------------------------------------------------------------------------------------
    # Stages
    # ----------------------------------------------------------------------------------------------------------

    def tokenize(self, imgs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.tokenizers[m](x) for m, x in imgs.items()}  # {m: (B, N, D)}

    @torch.compiler.disable  # dynamo cannot trace a draw from an explicit torch.Generator: one break, up front
    def draw_noise(self, batch: int, device, generator=None) -> dict[str, torch.Tensor]:
        """Every random number of one forward pass, drawn first so the stages after it are pure functions.

        {"mask": (draws, B, N) masking noise (one draw per modality, or one shared with consistent_mask),
        "boxes": (B, 4) crop boxes, one per scene and shared by its modalities, "crop_mask": the masking noise of
        the crops}; the last two only with the contrastive branch. Drawn for the global batch of world * B rows and
        sliced to this rank's rows (`shard` = (rank, world)), so a data-parallel run draws exactly what one process
        on the global batch would."""
        rank, world = self._shard
        mine = slice(rank * batch, (rank + 1) * batch)
        draws = 1 if self.cfg.consistent_mask else len(self.modalities)

        def mask_noise():
            return torch.stack([torch.rand(batch * world, self.num_patches, device=device, generator=generator)[mine]
                                for _ in range(draws)])

        noise = {"mask": mask_noise()}
        if self.cfg.contrastive:
            size = self.img_size
            noise["boxes"] = ops.random_boxes(batch * world, size, size, scale=tuple(self.cfg.crop_scale),
                                              generator=generator, device=device)[mine]
            noise["crop_mask"] = mask_noise()
        return noise

    def mask(self, tokens: dict[str, torch.Tensor], noise: torch.Tensor):
        """Keeps n_keep random tokens per modality (the same positions in all of them with consistent_mask);
        `noise` (draws, B, N) from `draw_noise`."""
        visible, masks, restores = {}, {}, {}
        for i, (m, x) in enumerate(tokens.items()):
            ids_keep, masks[m], restores[m] = random_masking(noise[min(i, len(noise) - 1)], self.n_keep)
            visible[m] = gather_tokens(x, ids_keep)  # (B, n, D)
        return visible, masks, restores

    def encode_tokens(self, tokens: dict[str, torch.Tensor],
                      levels: Sequence[int] = ()) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Stem (per modality) -> CAF -> encoder -> norm over the given token sets, {m: (B, L_m, D)} in and out.

        With `levels` (indices into [fusion stem, block 1, ..., block depth]) it returns those levels instead, in
        the order given; the last level is normalized, as the encoder's output is."""
        names = list(tokens)
        segments = [t.shape[1] for t in tokens.values()]

        def split(x):
            return dict(zip(names, torch.split(x, segments, dim=1)))

        x = []
        for m, t in tokens.items():  # stem: each modality alone, its own weights
            for blk in self.stem[m]:
                t = blk(t, [t.shape[1]])
            x.append(t)
        x = torch.cat(x, dim=1)  # (B, sum L_m, D)
        allow = self.caf_allow[: len(names), : len(names)]  # ~eye: only the other modalities
        for blk in self.caf_blocks:
            x = blk(x, segments, allow)
        taken = {0: x}
        for i, blk in enumerate(self.blocks, 1):
            x = blk(x, segments)  # allow all
            taken[i] = x
        last = len(self.blocks)
        if not levels:
            return split(self.norm(x))
        taken[last] = self.norm(taken[last])
        return [split(taken[i]) for i in levels]

    def decode(self, latent: dict[str, torch.Tensor], restores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context, segments = None, [t.shape[1] for t in latent.values()]
        if self.cfg.cmf:  # (B, sum n_m, Dd): all modalities, projected once and shared by every decoder
            context = torch.cat([self.cmf_embed(t) + self.cmf_modality_embed[m] for m, t in latent.items()], 1)
        return {m: self.decoders[m](latent[m], restores[m], context, segments) for m in latent}

    def reconstruction_loss(self, m: str, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        target = self.patchify(m, imgs).float()  # (B, N, p*p*C)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(-1)  # (B, N)
        return (loss * mask).sum() / mask.sum()  # masked patches only

    def contrastive_loss(self, imgs: dict[str, torch.Tensor], latent: dict[str, torch.Tensor], noise: dict):
        """Cross-scale InfoNCE between the (masked) full view and a masked random crop of the same scene."""
        _, _, h, w = next(iter(imgs.values())).shape
        crops = {m: ops.crop_resize(x, noise["boxes"], (h, w), backend=self.cfg.ops_backend) for m, x in imgs.items()}  # {m: (B, C_m, H, W)}
        crop_visible, _, _ = self.mask(self.tokenize(crops), noise["crop_mask"])
        crop_latent = self.encode_tokens(crop_visible)

        def embed(feats):  # (M, B, P), mean over the modality's tokens, projected, L2-normalized
            return torch.stack([F.normalize(self.proj_heads[m](t.mean(1)).float(), dim=-1) for m, t in feats.items()])

        return ops.multiscale_infonce(embed(latent), embed(crop_latent), temperature=self.cfg.temperature,
                                      group=self.contrastive_group, backend=self.cfg.ops_backend)

    # ----------------------------------------------------------------------------------------------------------
    # Public entry points
    # ----------------------------------------------------------------------------------------------------------

    def forward(self, batch, generator: torch.Generator | None = None, step: torch.Tensor | None = None) -> dict:
        """The pretraining losses of one batch: {"objective", "loss", "loss_rec", "loss_con", "pred", "mask"}.

        `objective` is what the engine backpropagates. Under data parallelism the contrastive term is global
        (negatives from the whole batch), so its local gradient is this rank's share of the global gradient
        while DDP/FSDP average the gradients over ranks: the objective weighs it by world size, and the averaged
        gradient equals the single-process gradient of `loss` on the global batch. `step` is unused (no schedule
        in this model)."""
        imgs = self.check_batch(batch, self.modalities)  # {m: (B, C_m, H, W)}
        any_x = next(iter(imgs.values()))
        noise = self.draw_noise(any_x.shape[0], any_x.device, generator)
        visible, mask, restores = self.mask(self.tokenize(imgs), noise["mask"])  # {m: (B, n, D)}, {m: (B, N)}
        latent = self.encode_tokens(visible)  # {m: (B, n, D)}
        pred = self.decode(latent, restores)  # {m: (B, N, p*p*C_m)}
        loss_rec = torch.stack([self.reconstruction_loss(m, imgs[m], pred[m], mask[m]) for m in imgs]).mean()
        if self.cfg.contrastive:
            loss_con = self.contrastive_loss(imgs, latent, noise)
        else:
            loss_con = loss_rec.new_zeros(())
        loss = loss_rec + self.cfg.contrastive_weight * loss_con
        world = self._shard[1]
        objective = loss if world == 1 else loss_rec + (self.cfg.contrastive_weight * world) * loss_con
        return {"objective": objective, "loss": loss, "loss_rec": loss_rec, "loss_con": loss_con, "pred": pred,
                "mask": mask}

    def _encoder_input(self, batch, modalities: Sequence[str] | None) -> dict[str, torch.Tensor]:
        mods = tuple(self.modalities if modalities is None else modalities)
        if not mods or len(set(mods)) != len(mods):
            raise ValueError(f"modalities must be a non-empty list of distinct names; got {list(mods)}")
        return self.tokenize(self.check_batch(batch, mods))

    def encode(self, batch, modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """All tokens of the given modalities (default: all), unmasked, encoded: {m: (B, N, D)}."""
        return self.encode_tokens(self._encoder_input(batch, modalities))

    def forward_intermediates(self, batch, modalities: Sequence[str] | None = None,
                              indices: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """Unmasked tokens at feature levels `indices` (default: all `feature_levels`): level 0 after the fusion
        stem (stem + CAF), level i after encoder block i; the last level is `encode`'s output. [{m: (B, N, D)}]."""
        indices = list(range(self.feature_levels)) if indices is None else [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.feature_levels]
        if bad or not indices:
            raise ValueError(f"feature levels {indices} must be a non-empty list in [0, {self.feature_levels})")
        return self.encode_tokens(self._encoder_input(batch, modalities), levels=indices)

    @torch.no_grad()
    def visualize(self, batch, generator: torch.Generator | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """{m: {"input", "masked", "reconstruction"}} images (B, C, H, W) in the (normalized) input space."""
        out = self.forward(batch, generator)
        result = {}
        for m in self.modalities:
            x = batch[m]
            target = self.patchify(m, x)  # (B, N, p*p*C)
            pred = out["pred"][m].to(target.dtype)
            if self.cfg.norm_pix_loss:  # back from per-patch normalized units
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                pred = pred * (var + 1e-6) ** 0.5 + mean
            mask = out["mask"][m].unsqueeze(-1).to(target.dtype)  # (B, N, 1)
            result[m] = {
                "input": x,
                "masked": self.unpatchify(m, target * (1 - mask)),
                "reconstruction": self.unpatchify(m, pred * mask + target * (1 - mask)),
            }
        return result

    def flops_per_sample(self, training: bool = True) -> float:
        """Analytic matmul FLOPs (2 per multiply-add) of one pretraining sample; x3 for forward + backward.

        Attention counts only the allowed (query, key) pairs; norms, activations and the crop are ignored.
        """
        cfg = self.cfg
        d, dd, n_tok, n = cfg.embed_dim, cfg.decoder_dim, self.num_patches, self.n_keep
        k = len(self.modalities)
        hid, dhid = int(d * cfg.mlp_ratio), int(dd * cfg.mlp_ratio)

        def block(lq, pairs, dim, hidden, lk=None):
            lk = lq if lk is None else lk
            linear = 2 * lq * dim * dim * 2 + 2 * lk * dim * dim * 2 + 2 * lq * dim * hidden * 2  # q,proj | kv | mlp
            return linear + 2 * 2 * pairs * dim

        def encoder_pass():
            f = sum(2 * n_tok * len(b) * cfg.patch_size**2 * d for b in self.bands.values())
            f += k * cfg.stem_depth * block(n, n * n, d, hid)
            if cfg.caf:
                f += cfg.caf_depth * block(k * n, k * n * (k - 1) * n, d, hid)
            return f + cfg.encoder_depth * block(k * n, (k * n) ** 2, d, hid)

        total = encoder_pass()
        if cfg.cmf:
            total += 2 * k * n * d * dd
        for b in self.bands.values():
            total += 2 * n * d * dd  # decoder_embed
            if cfg.cmf:
                total += block(n_tok, n_tok * k * n, dd, dhid, lk=k * n)
            total += cfg.decoder_depth * block(n_tok, n_tok * n_tok, dd, dhid)
            total += 2 * n_tok * dd * cfg.patch_size**2 * len(b)
        if cfg.contrastive:
            total += encoder_pass() + 2 * k * 2 * (2 * d * d + 2 * d * cfg.proj_dim)
        return float(total * (3 if training else 1))
