import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

# The plain eager reference step the engine is compared with lives beside the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

# A model small enough that a training step takes milliseconds: 32x32 images, 16 tokens per modality.
TINY = [
    "model.img_size=32", "model.patch_size=8", "model.embed_dim=16", "model.num_heads=2", "model.decoder_dim=16",
    "model.decoder_heads=2", "model.decoder_depth=1", "model.encoder_depth=1", "model.proj_dim=8",
    "model.mlp_ratio=2.0", "model.ops_backend=reference",
]


class SyntheticBEN(Dataset):
    """BigEarthNet-shaped random samples (s1: 2 bands, s2: 12 bands), deterministic per index."""

    def __init__(self, n=8, size=32, nan_at=None):
        self.n, self.size, self.nan_at = n, size, nan_at
        self.ids = [f"synthetic_{i:03d}" for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        s1 = torch.randn(2, self.size, self.size, generator=g)
        s2 = torch.randn(12, self.size, self.size, generator=g)
        if self.nan_at is not None and i == self.nan_at:
            s2[0, 0, 0] = float("nan")
        label = (torch.rand(19, generator=g) < 0.3).float()
        return {"s1": s1, "s2": s2, "label": label, "id": self.ids[i]}


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture
def synthetic():
    return SyntheticBEN


# Per-model tiny overrides (the baselines' tests): every registered pretraining model at 32x32 images, 8 px
# patches, widths of 16 and one block, so that a step takes milliseconds. Each model validates its own keys.
TINY_MODELS = {
    "mmfuse": list(TINY),
    "fus_mae": [
        "model.name=fus_mae", "model.img_size=32", "model.patch_size=8", "model.embed_dim=16", "model.num_heads=2",
        "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_depth=1", "model.encoder_depth=1",
        "model.mlp_ratio=2.0", "model.ops_backend=reference",
    ],
    "satvit": [
        "model.name=satvit", "model.img_size=32", "model.patch_size=8", "model.embed_dim=16", "model.num_heads=2",
        "model.depth=1", "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_depth=1",
        "model.mlp_ratio=2.0", "model.ops_backend=reference",
    ],
    "dino_mm": [
        "model.name=dino_mm", "model.img_size=32", "model.patch_size=8", "model.embed_dim=16", "model.num_heads=2",
        "model.depth=1", "model.mlp_ratio=2.0", "model.head_hidden_dim=32", "model.head_bottleneck_dim=8",
        "model.out_dim=32", "model.local_crops_number=2", "model.local_crop_size=16", "model.freeze_last_layer_steps=2",
        "model.ops_backend=reference",
    ],
}


def tiny_model_overrides(name: str) -> list[str]:
    """The tiny overrides of model `name` (TINY for the paper's model)."""
    return list(TINY_MODELS[name])
