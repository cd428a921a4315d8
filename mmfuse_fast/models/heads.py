"""Task heads on a backbone (the backbone contract of models/contract.py: `embed_dim`, `modalities`,
`encode(batch, modalities) -> {token set: (B, N, D)}`)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from mmfuse_fast.models.contract import chosen_modalities, token_sets

POOLINGS = ("mean", "concat")


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

    pooling "mean": mean over all tokens of the chosen modalities (D features); "concat": per-token-set means,
    concatenated (k*D features for k modalities of a per-modality backbone; D for a channel-stack one). With `freeze_backbone` (linear probe) the backbone's parameters do not require
    grad, it runs under no_grad and stays in eval mode; otherwise (fine-tuning) it trains with the head.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 19, modalities: Sequence[str] | None = None,
                 pooling: str = "mean", freeze_backbone: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.backbone = backbone
        self.modalities = chosen_modalities(backbone, modalities)
        self.pooling, self.freeze_backbone, self.num_classes = pooling, freeze_backbone, num_classes
        dim = backbone.embed_dim * (len(token_sets(backbone, self.modalities)) if pooling == "concat" else 1)
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
