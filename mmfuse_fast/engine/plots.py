"""Figures of a pretraining run: the loss curves and masked-reconstruction examples (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmfuse_fast.engine.logging import read_metrics

__all__ = ["pyplot", "plot_loss_curves", "plot_reconstructions", "true_colour", "percentile_stretch", "band_index"]

TRUE_COLOUR = ("B04", "B03", "B02")  # red, green, blue


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_path: str | Path) -> Path:
    """Lay out, write `fig` to `out_path` (creating its folder) and close it; returns the path."""
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_loss_curves(metrics_path: str | Path, out_path: str | Path, title: str = "pretraining loss") -> Path:
    """Total, reconstruction and contrastive loss against the step, from a metrics.jsonl (or its run dir)."""
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"no metrics records in {metrics_path}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in (("loss", "total"), ("loss_rec", "reconstruction"), ("loss_con", "contrastive")):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, label=label, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, out_path)


def band_index(bands: Sequence[str], name: str) -> int:
    """Channel index of band `name` in a modality's band list (by name, never by position)."""
    try:
        return list(bands).index(name)
    except ValueError:
        raise ValueError(f"band {name!r} is not among the modality's bands {list(bands)}") from None


def percentile_stretch(img: np.ndarray, ref: np.ndarray | None = None, lo: float = 2, hi: float = 98) -> np.ndarray:
    """Per-channel linear stretch of (H, W, C) or (H, W) `img` to [0, 1] between the lo/hi percentiles of `ref`
    (default: `img`), clipped."""
    ref = img if ref is None else ref
    axes = (0, 1)
    p_lo = np.percentile(ref, lo, axis=axes, keepdims=True)
    p_hi = np.percentile(ref, hi, axis=axes, keepdims=True)
    return np.clip((img - p_lo) / np.maximum(p_hi - p_lo, 1e-6), 0, 1)


def true_colour(img: torch.Tensor, bands: Sequence[str]) -> np.ndarray:
    """(C, H, W) S2 tensor -> (H, W, 3) array of B04, B03, B02, found by name."""
    idx = [band_index(bands, b) for b in TRUE_COLOUR]
    return img[idx].permute(1, 2, 0).float().cpu().numpy()


@torch.no_grad()
def plot_reconstructions(model: torch.nn.Module, batch: dict, out_path: str | Path, n: int = 4,
                         generator: torch.Generator | None = None, s2: str = "s2", s1: str = "s1",
                         s1_band: str = "VV") -> Path:
    """Rows: up to `n` samples. Columns: S2 true colour (B04/B03/B02) input / masked / reconstruction, then S1
    `s1_band` input / masked / reconstruction. Bands are looked up by name in `model.bands`. The stretch of each
    row's input (2-98 percentiles) is applied to its masked and reconstructed images too, so they compare."""
    was_training = model.training
    model.eval()
    batch = {k: (v[:n] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    vis = model.visualize(batch, generator=generator)
    model.train(was_training)
    bands = getattr(model, "bands", None) or {m: tuple(b) for m, b in model.cfg.modalities.items()}
    kinds = ("input", "masked", "reconstruction")
    columns = []  # (title, modality, kind)
    if s2 in vis:
        columns += [(f"S2 RGB {k}", s2, k) for k in kinds]
    if s1 in vis:
        columns += [(f"S1 {s1_band} {k}", s1, k) for k in kinds]
    if not columns:
        raise ValueError(f"the model has neither {s2!r} nor {s1!r}; modalities: {list(vis)}")
    rows = next(iter(vis.values()))["input"].shape[0]
    plt = pyplot()
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), dpi=110, squeeze=False)
    for r in range(rows):
        refs = {}
        for c, (title, m, kind) in enumerate(columns):
            img = vis[m][kind][r]
            if m == s2:
                arr = true_colour(img, bands[m])
            else:
                arr = img[band_index(bands[m], s1_band)].float().cpu().numpy()
            if kind == "input":
                refs[m] = arr
            shown = percentile_stretch(arr, refs[m])
            if kind == "masked":  # masked patches are exactly zero: paint them light grey
                hidden = arr == 0 if arr.ndim == 2 else (arr == 0).all(-1)
                shown[hidden] = 0.85
            ax = axes[r, c]
            ax.imshow(shown, cmap=None if m == s2 else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
    return _save(plt, fig, out_path)
