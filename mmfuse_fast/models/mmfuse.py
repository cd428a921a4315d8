"""The paper's model: multimodal masked autoencoder with cross-attention fusion (CAF), cross-modality fusion
decoders (CMF) and a cross-scale contrastive loss (docs/method.md), in the style of MAE's `models_mae.py`.

Shapes: B batch, M modalities, N = (img_size / patch_size)**2 patches per modality, n = n_keep visible patches
per modality (static: int(N * (1 - mask_ratio))), D encoder width, Dd decoder width, P projection width.

    forward(batch)
      tokenize        {m: (B, C_m, H, W)} -> {m: (B, N, D)}        own PatchEmbed + sincos pos + modality embed
      mask            -> {m: (B, n, D)}, mask {m: (B, N)}           noise argsort + gather, static n
      encode_tokens   stem (per modality) -> CAF (allow ~eye(M)) -> encoder (allow all, or eye(M) with
                      encoder_fusion "separate") -> norm: {m: (B, n, D)}
      decode          per modality: own tokens + mask tokens (B, N, Dd) x-attend to all modalities (B, M*n, Dd)
                      (or to the others: decoder_context "others")
                      -> decoder blocks -> head: {m: (B, N, p*p*C_m)}
      loss            MSE on masked patches, mean over modalities  +  lambda * cross-scale InfoNCE
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfuse_fast import ops
from mmfuse_fast.models.contract import check_batch, chosen_modalities
from mmfuse_fast.models.draws import GlobalBatchDraws
from mmfuse_fast.models.layers import Block, ModalityTokenizer, block_flops, init_weights, set_backend
from mmfuse_fast.models.mae import (MaskedDecoder, denormalize_patches, gather_tokens, masked_mse, patchify,
                                    random_masking, unpatchify)
from mmfuse_fast.models.registry import register_model


@register_model("mmfuse")
class MMFuseMAE(GlobalBatchDraws, nn.Module):
    """The pretraining and backbone contracts of models/contract.py over the stages above.

    Options the comparison needs (docs/method.md, "Ablations"): `caf`, `cmf`, `contrastive` switch stages off;
    `encoder_fusion` "separate" keeps the encoder blocks within each modality; `decoder_context` "others" lets a
    modality's decoder see only the other modalities (Fus-MAE); `sensor_drop` removes one modality of a sample from
    the fusion during pretraining, through the attention op's per-sample used lengths (shapes stay static)."""

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
        # Set-level allow matrices; a subset of k modalities uses the [:k, :k] view (the same pattern).
        # CAF (and a decoder seeing "others"): set i attends to every set j != i; "separate" encoder: only to i.
        n_mod = len(self.modalities)
        self.register_buffer("caf_allow", ~torch.eye(n_mod, dtype=torch.bool), persistent=False)
        self.register_buffer("own_allow", torch.eye(n_mod, dtype=torch.bool), persistent=False)

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

    def set_backend(self, backend: str) -> None:
        """Switches every attention to `backend` ("auto" | "triton" | "reference"); weights are unchanged."""
        set_backend(self, backend)
        self.cfg.ops_backend = backend

    # ----------------------------------------------------------------------------------------------------------
    # Input handling
    # ----------------------------------------------------------------------------------------------------------

    def check_batch(self, batch, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        """{m: (B, C_m, H, W)} for the requested modalities, with a clear error on anything missing or misshapen."""
        return check_batch(self, batch, modalities)

    def patchify(self, m: str, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patch-major then (row, col, channel) inside a patch (as MAE)."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, m: str, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        return unpatchify(patches, self.patch_size, len(self.bands[m]))

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
        the crops} (the last two only with the contrastive branch), and with sensor_drop "keep": (B, M) 1 for the
        modalities each sample keeps. Drawn for the global batch and sliced to this rank's rows (models/draws.py)."""
        draws = 1 if self.cfg.consistent_mask else len(self.modalities)

        def mask_noise():
            return torch.stack([self.draw_uniform(batch, self.num_patches, device=device, generator=generator)
                                for _ in range(draws)])

        noise = {"mask": mask_noise()}
        if self.cfg.contrastive:
            noise["boxes"] = self.draw_boxes(batch, self.img_size, self.img_size, self.cfg.crop_scale, device,
                                             generator)
            noise["crop_mask"] = mask_noise()
        if self.cfg.sensor_drop > 0:  # with probability p one modality, chosen uniformly, is dropped
            u = self.draw_uniform(batch, 2, device=device, generator=generator)
            n_mod = len(self.modalities)
            which = (u[:, 1:] * n_mod).long().clamp_(max=n_mod - 1)  # (B, 1)
            # a comparison, not F.one_hot: one_hot checks its input's range on the host
            dropped = (which == torch.arange(n_mod, device=device)) & (u[:, :1] < self.cfg.sensor_drop)
            noise["keep"] = (~dropped).float()
        return noise

    def mask(self, tokens: dict[str, torch.Tensor], noise: torch.Tensor):
        """Keeps n_keep random tokens per modality (the same positions in all of them with consistent_mask);
        `noise` (draws, B, N) from `draw_noise`."""
        visible, masks, restores = {}, {}, {}
        for i, (m, x) in enumerate(tokens.items()):
            ids_keep, masks[m], restores[m] = random_masking(noise[min(i, len(noise) - 1)], self.n_keep)
            visible[m] = gather_tokens(x, ids_keep)  # (B, n, D)
        return visible, masks, restores

    def encode_tokens(self, tokens: dict[str, torch.Tensor], levels: Sequence[int] = (),
                      used: torch.Tensor | None = None) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Stem (per modality) -> CAF -> encoder -> norm over the given token sets, {m: (B, L_m, D)} in and out.

        With `levels` (indices into [fusion stem, block 1, ..., block depth]) it returns those levels instead, in
        the order given; the last level is normalized, as the encoder's output is. `used` (B, k) int32: per sample
        the tokens of each set that take part in the fusion (0 drops the set; sensor_drop)."""
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
        k = len(names)
        caf_allow = self.caf_allow[:k, :k]  # ~eye: only the other modalities
        encoder_allow = None if self.cfg.encoder_fusion == "joint" else self.own_allow[:k, :k]
        for blk in self.caf_blocks:
            x = blk(x, segments, caf_allow, used)
        taken = {0: x}
        for i, blk in enumerate(self.blocks, 1):
            x = blk(x, segments, encoder_allow, used)
            taken[i] = x
        last = len(self.blocks)
        if not levels:
            return split(self.norm(x))
        taken[last] = self.norm(taken[last])
        return [split(taken[i]) for i in levels]

    def decode(self, latent: dict[str, torch.Tensor], restores: dict[str, torch.Tensor],
               used: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each modality's decoder over its own tokens, cross-attending (CMF) to the encoded tokens of all
        modalities or, with decoder_context "others", of the other ones; `used` as in encode_tokens."""
        context, segments = None, [t.shape[1] for t in latent.values()]
        if self.cfg.cmf:  # (B, sum n_m, Dd): all modalities, projected once and shared by every decoder
            context = torch.cat([self.cmf_embed(t) + self.cmf_modality_embed[m] for m, t in latent.items()], 1)
        k = len(latent)
        others = self.cfg.decoder_context == "others"
        return {m: self.decoders[m](latent[m], restores[m], context, segments,
                                    self.caf_allow[i:i + 1, :k] if others else None, used)
                for i, m in enumerate(latent)}

    def reconstruction_loss(self, m: str, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                            weight: torch.Tensor | None = None):
        return masked_mse(pred, self.patchify(m, imgs), mask, self.cfg.norm_pix_loss, weight)

    def contrastive_loss(self, imgs: dict[str, torch.Tensor], latent: dict[str, torch.Tensor], noise: dict):
        """Cross-scale InfoNCE between the (masked) full view and a masked random crop of the same scene."""
        _, _, h, w = next(iter(imgs.values())).shape
        crops = {m: ops.crop_resize(x, noise["boxes"], (h, w), backend=self.cfg.ops_backend)
                 for m, x in imgs.items()}  # {m: (B, C_m, H, W)}
        crop_visible, _, _ = self.mask(self.tokenize(crops), noise["crop_mask"])
        crop_latent = self.encode_tokens(crop_visible)

        def embed(feats):  # (M, B, P), mean over the modality's tokens, projected, L2-normalized
            return torch.stack([F.normalize(self.proj_heads[m](t.mean(1)).float(), dim=-1) for m, t in feats.items()])

        return ops.multiscale_infonce(embed(latent), embed(crop_latent), temperature=self.cfg.temperature,
                                      group=self.data_parallel_group, backend=self.cfg.ops_backend)

    # ----------------------------------------------------------------------------------------------------------
    # Public entry points
    # ----------------------------------------------------------------------------------------------------------

    def forward(self, batch, generator: torch.Generator | None = None, step: torch.Tensor | None = None) -> dict:
        """The pretraining losses of one batch: {"objective", "loss", "loss_rec", "loss_con", "pred", "mask"}.

        `objective` is what the engine backpropagates. Under data parallelism the contrastive term is global
        (negatives from the whole batch), so its local gradient is this rank's share of the global gradient
        while DDP/FSDP average the gradients over ranks: the objective weighs it by world size, and the averaged
        gradient equals the single-process gradient of `loss` on the global batch. `step` is unused (no schedule
        in this model).

        With sensor_drop, a dropped modality of a sample takes no part in any attention of the encoder or in the
        CMF memory, and its reconstruction is left out of the loss (which keeps the static denominator, so that it
        stays a plain mean over the global batch)."""
        imgs = self.check_batch(batch, self.modalities)  # {m: (B, C_m, H, W)}
        any_x = next(iter(imgs.values()))
        noise = self.draw_noise(any_x.shape[0], any_x.device, generator)
        keep = noise.get("keep")  # (B, M) or None
        used = None if keep is None else (keep * self.n_keep).to(torch.int32)
        visible, mask, restores = self.mask(self.tokenize(imgs), noise["mask"])  # {m: (B, n, D)}, {m: (B, N)}
        latent = self.encode_tokens(visible, used=used)  # {m: (B, n, D)}
        pred = self.decode(latent, restores, used)  # {m: (B, N, p*p*C_m)}
        loss_rec = torch.stack([self.reconstruction_loss(m, imgs[m], pred[m], mask[m],
                                                         None if keep is None else keep[:, i])
                                for i, m in enumerate(imgs)]).mean()
        if self.cfg.contrastive:
            loss_con = self.contrastive_loss(imgs, latent, noise)
        else:
            loss_con = loss_rec.new_zeros(())
        loss = loss_rec + self.cfg.contrastive_weight * loss_con
        world = self.world_size
        objective = loss if world == 1 else loss_rec + (self.cfg.contrastive_weight * world) * loss_con
        return {"objective": objective, "loss": loss, "loss_rec": loss_rec, "loss_con": loss_con, "pred": pred,
                "mask": mask}

    def _encoder_input(self, batch, modalities: Sequence[str] | None) -> dict[str, torch.Tensor]:
        return self.tokenize(self.check_batch(batch, chosen_modalities(self, modalities)))

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
                pred = denormalize_patches(pred, target)
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
        encoder_pairs = (k * n) ** 2 if cfg.encoder_fusion == "joint" else k * n * n
        context_sets = k if cfg.decoder_context == "all" else k - 1

        def encoder_pass():
            f = sum(2 * n_tok * len(b) * cfg.patch_size**2 * d for b in self.bands.values())
            f += k * cfg.stem_depth * block_flops(n, n * n, d, hid)
            if cfg.caf:
                f += cfg.caf_depth * block_flops(k * n, k * n * (k - 1) * n, d, hid)
            return f + cfg.encoder_depth * block_flops(k * n, encoder_pairs, d, hid)

        total = encoder_pass()
        if cfg.cmf:
            total += 2 * k * n * d * dd
        for b in self.bands.values():
            total += 2 * n * d * dd  # decoder_embed
            if cfg.cmf:
                total += block_flops(n_tok, n_tok * context_sets * n, dd, dhid, lk=k * n)
            total += cfg.decoder_depth * block_flops(n_tok, n_tok * n_tok, dd, dhid)
            total += 2 * n_tok * dd * cfg.patch_size**2 * len(b)
        if cfg.contrastive:
            total += encoder_pass() + 2 * k * 2 * (2 * d * d + 2 * d * cfg.proj_dim)
        return float(total * (3 if training else 1))
