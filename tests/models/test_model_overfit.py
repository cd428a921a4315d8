"""Every registered model's tiny config overfits one real BigEarthNet v2 batch (the 8 train scenes)."""

import pytest
import torch

from mmfuse_fast.config import PretrainConfig, load_config
from mmfuse_fast.models import MODELS, build_model


def load_batch(root, n=8):
    from mmfuse_fast.data import BigEarthNetV2

    ds = BigEarthNetV2(root, split="train")
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {m: torch.stack([it[m] for it in items]) for m in ("s1", "s2")}


def test_tiny_model_overfits_one_real_batch(ben_v2_root):
    torch.manual_seed(0)
    batch = load_batch(ben_v2_root)
    assert batch["s2"].shape == (8, 12, 120, 120) and torch.isfinite(batch["s2"]).all()
    cfg = load_config(PretrainConfig, "tiny").model
    cfg.ops_backend = "reference"
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    def loss_at(seed):  # fixed masks and crops: a deterministic objective to overfit
        return model(batch, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        initial = loss_at(0)
    for _ in range(12):
        out = loss_at(0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        final = loss_at(0)
    assert final["loss"] < 0.7 * initial["loss"], (initial["loss"], final["loss"])
    assert final["loss_rec"] < initial["loss_rec"] and final["loss_con"] < initial["loss_con"]


@pytest.mark.parametrize("config", ["satvit_tiny", "fus_mae_tiny", "dino_mm_tiny"])
def test_baseline_overfits_one_real_batch(ben_v2_root, config):
    cfg = load_config(PretrainConfig, config).model
    if cfg.name not in MODELS:
        pytest.skip(f"{cfg.name} is not registered")
    torch.manual_seed(0)
    batch = load_batch(ben_v2_root)
    cfg.ops_backend = "reference"
    model = build_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    after = getattr(model, "after_optimizer_step", None)
    if hasattr(model, "set_total_steps"):
        model.set_total_steps(STEPS)

    def loss_at(step):  # fixed masks, crops and views: a deterministic objective to overfit
        return model(batch, generator=torch.Generator().manual_seed(0), step=torch.tensor(float(step),
                                                                                          dtype=torch.float64))

    def fit(out):  # DINO: the loss minus the teacher's entropy, KL(teacher || student); centering flattens the
        return out["loss"] - out.get("teacher_entropy", 0.0)  # teacher, so its cross-entropy alone can rise

    with torch.no_grad():
        initial = fit(loss_at(0))
    for step in range(STEPS):
        opt.zero_grad()
        loss_at(step)["objective"].backward()
        opt.step()
        if after is not None:
            after(torch.tensor(float(step), dtype=torch.float64), torch.tensor(False))
    with torch.no_grad():
        final = fit(loss_at(STEPS))
    assert final < 0.8 * initial, (float(initial), float(final))


STEPS = 12
