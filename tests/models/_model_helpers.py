"""Shared helpers of the model tests: a very small config, random batches, call counters on the ops."""

from __future__ import annotations

import dataclasses

import torch

from mmfuse_fast import ops
from mmfuse_fast.config import ModelConfig

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, stem_depth=1, caf_depth=1, encoder_depth=2,
             decoder_dim=32, decoder_depth=1, decoder_heads=2, proj_dim=16, ops_backend="reference")


def small_cfg(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig(**SMALL), **overrides)


def random_batch(cfg: ModelConfig, batch: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {m: torch.randn(batch, len(b), cfg.img_size, cfg.img_size, generator=g) for m, b in cfg.modalities.items()}
    out["label"] = torch.zeros(batch, 19)
    out["id"] = [str(i) for i in range(batch)]
    return out


class OpSpy:
    """Wraps mmfuse_fast.ops functions (as the model modules look them up) and records every call."""

    NAMES = ("modality_attention", "multiscale_infonce", "crop_resize", "random_boxes")

    def __init__(self, monkeypatch):
        self.calls: dict[str, list] = {n: [] for n in self.NAMES}
        for name in self.NAMES:
            real = getattr(ops, name)

            def wrapper(*args, __real=real, __name=name, **kwargs):
                out = __real(*args, **kwargs)
                self.calls[__name].append((args, kwargs, out))
                return out

            monkeypatch.setattr(ops, name, wrapper)

    def count(self, name: str) -> int:
        return len(self.calls[name])

    def attention_allows(self) -> list:
        """The `allow` argument of every modality_attention call (None = all True)."""
        out = []
        for args, kwargs, _ in self.calls["modality_attention"]:
            out.append(kwargs["allow"] if "allow" in kwargs else (args[5] if len(args) > 5 else None))
        return out
