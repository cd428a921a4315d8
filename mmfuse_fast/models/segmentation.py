"""Semantic segmentation on the multimodal encoder: multi-level ViT features -> simple feature pyramid -> FPN ->
per-pixel logits, plus sliding-window inference for rasters larger than the model's input.

Multi-level features come from the backbone's `forward_intermediates` (models/contract.py): the token sets after
the fusion stem and after evenly spaced encoder blocks, the last one normalized; each level's modalities are
averaged token-wise (they share the patch grid) and reshaped to (B, D, g, g). As in ViTDet's simple feature
pyramid, the levels are brought to strides p/4, p/2, p, 2p (transposed convs / max-pool), then an FPN (lateral 1x1,
top-down sum, 3x3 smoothing) and the UPerNet-style fusion (all levels upsampled to the finest, concatenated, 3x3
conv) give logits at stride p/4, bilinearly upsampled to the input size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfuse_fast.models.contract import chosen_modalities
from mmfuse_fast.models.heads import BackboneTaskModel


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class SegmentationModel(BackboneTaskModel):
    """`forward(batch) -> (B, num_classes, H, W)` logits for {m: (B, C_m, H, W)} inputs (H = W = img_size).

    With `freeze_backbone` (linear-probe style) only the head trains and the backbone stays in eval mode."""

    def __init__(self, backbone: nn.Module, num_classes: int, modalities: Sequence[str] | None = None,
                 channels: int = 64, num_levels: int = 4, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.modalities = chosen_modalities(backbone, modalities)
        self.num_classes, self.freeze_backbone = num_classes, freeze_backbone
        self.img_size, self.patch_size = backbone.img_size, backbone.patch_size
        self.grid = backbone.img_size // backbone.patch_size
        d = backbone.embed_dim
        depth = backbone.feature_levels - 1
        # indices into the backbone's feature levels [fusion stem, block 1, ..., block depth]; the last always
        self.level_ids = sorted({round(i * depth / max(num_levels - 1, 1)) for i in range(num_levels)})
        scales = [4, 2, 1, 0.5][-len(self.level_ids):] if len(self.level_ids) <= 4 else [4, 2, 1, 0.5]
        self.scales = scales

        def rescale(s):
            if s == 4:
                return nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.GELU(), nn.ConvTranspose2d(d, d, 2, 2))
            if s == 2:
                return nn.ConvTranspose2d(d, d, 2, 2)
            if s == 1:
                return nn.Identity()
            return nn.MaxPool2d(2, ceil_mode=True)

        self.rescale = nn.ModuleList(rescale(s) for s in scales)
        self.lateral = nn.ModuleList(_conv_bn_relu(d, channels, 1) for _ in scales)
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in scales)
        self.fuse = _conv_bn_relu(channels * len(scales), channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self._freeze_backbone_if_set()

    def multilevel_features(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """[(B, D, g, g)] at the chosen levels, token sets averaged (they share the patch grid)."""
        out = []
        for level in self.backbone.forward_intermediates(batch, self.modalities, self.level_ids):
            per_mod = torch.stack(list(level.values())).mean(0)  # (B, N, D)
            b, n, d = per_mod.shape
            out.append(per_mod.transpose(1, 2).reshape(b, d, self.grid, self.grid))
        return out

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feats = self.multilevel_features(batch)
        pyramid = [lat(rs(f)) for f, rs, lat in zip(feats, self.rescale, self.lateral)]  # fine -> coarse
        for i in range(len(pyramid) - 2, -1, -1):  # top-down
            pyramid[i] = pyramid[i] + F.interpolate(pyramid[i + 1], size=pyramid[i].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        pyramid = [sm(p) for sm, p in zip(self.smooth, pyramid)]
        size = pyramid[0].shape[-2:]
        fused = self.fuse(torch.cat([pyramid[0]] + [F.interpolate(p, size=size, mode="bilinear",
                                                                  align_corners=False) for p in pyramid[1:]], 1))
        logits = self.classifier(fused)
        any_x = batch[self.modalities[0]]
        return F.interpolate(logits, size=any_x.shape[-2:], mode="bilinear", align_corners=False)


def _starts(size: int, window: int, stride: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@torch.no_grad()
def sliding_window_logits(model: Callable[[dict], torch.Tensor], images: Mapping[str, torch.Tensor], window: int,
                          num_classes: int, stride: int | None = None, batch_size: int = 16) -> torch.Tensor:
    """(B, K, H, W) logits of `model` over {m: (B, C_m, H, W)} images of any size, from window x window tiles
    with `stride` (default window // 2), overlapping logits averaged. Images smaller than the window are
    zero-padded (0 = the band mean after normalization) bottom/right and the padding cropped off."""
    stride = stride or max(1, window // 2)
    any_x = next(iter(images.values()))
    b, _, h, w = any_x.shape
    ph, pw = max(h, window), max(w, window)
    if (ph, pw) != (h, w):
        images = {m: F.pad(x, (0, pw - w, 0, ph - h)) for m, x in images.items()}
    if (ph, pw) == (window, window):
        return model(dict(images))[..., :h, :w]
    out = any_x.new_zeros(b, num_classes, ph, pw, dtype=torch.float32)
    count = any_x.new_zeros(1, 1, ph, pw, dtype=torch.float32)
    boxes = [(y, x) for y in _starts(ph, window, stride) for x in _starts(pw, window, stride)]
    per_call = max(1, batch_size // max(b, 1))
    for i in range(0, len(boxes), per_call):
        chunk = boxes[i:i + per_call]
        tiles = {m: torch.cat([x[..., y:y + window, xx:xx + window] for y, xx in chunk]) for m, x in images.items()}
        logits = model(tiles).float().reshape(len(chunk), b, num_classes, window, window)
        for (y, xx), lg in zip(chunk, logits):
            out[..., y:y + window, xx:xx + window] += lg
            count[..., y:y + window, xx:xx + window] += 1
    return (out / count)[..., :h, :w]
