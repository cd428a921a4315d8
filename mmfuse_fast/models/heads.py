"""Task heads on a backbone (the backbone contract of models/contract.py: `embed_dim`, `modalities`,
`encode(batch, modalities) -> {m: (B, N, D)}`)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

POOLINGS = ("mean", "concat")


def backbone_modalities(backbone: nn.Module, modalities: Sequence[str] | None) -> tuple[str, ...]:
    """`modalities` (default: all of the backbone's) as a tuple, checked to be a non-empty subset of the backbone's."""
    chosen = tuple(modalities) if modalities is not None else tuple(backbone.modalities)
    unknown = [m for m in chosen if m not in backbone.modalities]
    if unknown or not chosen:
        raise ValueError(f"modalities {list(chosen)} must be a non-empty subset of the backbone's "
                         f"{list(backbone.modalities)}")
    return chosen


class BackboneTaskModel(nn.Module):
    """Base of the task models holding a `backbone` and a `freeze_backbone` flag: a frozen backbone does not
    require grad and stays in eval mode, whatever `train()` is asked."""

    def _freeze_backbone_if_set(self) -> None:
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self


class MultiLabelClassifier(BackboneTaskModel):
    """Pooled encoder tokens -> one Linear layer -> logits (B, num_classes) (BigEarthNet: 19 classes).

    pooling "mean": mean over all tokens of the chosen modalities (D features); "concat": per-modality means,
    concatenated (k*D features). With `freeze_backbone` (linear probe) the backbone's parameters do not require
    grad, it runs under no_grad and stays in eval mode; otherwise (fine-tuning) it trains with the head.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 19, modalities: Sequence[str] | None = None,
                 pooling: str = "mean", freeze_backbone: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.backbone = backbone
        self.modalities = backbone_modalities(backbone, modalities)
        self.pooling, self.freeze_backbone, self.num_classes = pooling, freeze_backbone, num_classes
        dim = backbone.embed_dim * (len(self.modalities) if pooling == "concat" else 1)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self._freeze_backbone_if_set()

    def features(self, batch) -> torch.Tensor:
        """(B, D) or (B, k*D) pooled features."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            tokens = self.backbone.encode(batch, self.modalities)  # {m: (B, N, D)}
        if self.pooling == "mean":
            return torch.cat(list(tokens.values()), dim=1).mean(1)
        return torch.cat([t.mean(1) for t in tokens.values()], dim=-1)

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.features(batch))  # (B, num_classes)
