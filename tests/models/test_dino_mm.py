"""DINO-MM (mmfuse_fast/models/dino_mm.py): the contract, the views (one crop per view kind, flips, sensor drop),
the last-layer freeze, the EMA teacher and centering hook, the backbone contract through the teacher, tracing
and host-sync freedom, config validation and a short overfit. Tiny shapes: 32 px images, 16 px local crops."""

import dataclasses
import math

import pytest
import torch

from mmfuse_fast.config import ConfigError, PretrainConfig, load_config
from mmfuse_fast.engine.optim import build_optimizer
from mmfuse_fast.engine.schedule import cosine_schedule
from mmfuse_fast.engine.step import TrainStep, forbid_host_sync
from mmfuse_fast.models import MODELS, DinoMM, build_model
from mmfuse_fast.models.contract import STACK, Backbone, PretrainModel
from mmfuse_fast.models.dino_mm import DinoMMConfig
from mmfuse_fast.models.vit import StackViT

from _model_helpers import OpSpy

B, L = 4, 2  # batch, local crops
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2, mlp_ratio=2.0, head_hidden_dim=32,
             head_bottleneck_dim=16, out_dim=64, local_crops_number=L, local_crop_size=16, freeze_last_layer_steps=3,
             ops_backend="reference")


def small_cfg(**overrides) -> DinoMMConfig:
    return dataclasses.replace(DinoMMConfig(**SMALL), **overrides)


def build(**overrides) -> DinoMM:
    torch.manual_seed(0)
    return DinoMM(small_cfg(**overrides))


def batch_for(model, n=B, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, len(b), model.img_size, model.img_size, generator=g) for m, b in model.bands.items()}


def run(model, batch, seed=0, step=0.0):
    return model(batch, generator=torch.Generator().manual_seed(seed), step=torch.tensor(float(step),
                                                                                      dtype=torch.float64))


def step_t(s):
    return torch.tensor(float(s), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- contract


def test_forward_contract_and_registry():
    model = build()
    assert MODELS["dino_mm"] is DinoMM and isinstance(model, PretrainModel) and isinstance(model, Backbone)
    assert model.batch_keys == ("s1", "s2") and model.missing_modality == "zero"
    out = run(model, batch_for(model))
    assert set(out) >= {"objective", *model.metric_names}
    for k in ("objective", *model.metric_names):
        assert out[k].dim() == 0 and torch.isfinite(out[k]), k
    assert out["objective"] is out["loss"]
    assert 0 < out["teacher_entropy"] <= math.log(64) + 1e-4
    assert out["teacher_temp"] == pytest.approx(0.04)
    # a model from its built-in config
    cfg = load_config(PretrainConfig, "dino_mm_tiny").model
    assert isinstance(cfg, DinoMMConfig) and isinstance(build_model(cfg), DinoMM)


def test_same_seed_same_loss():
    model, batch = build(), batch_for(build())
    a, b, c = run(model, batch, 1), run(model, batch, 1), run(model, batch, 2)
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["loss"], c["loss"])


def test_gradients_and_last_layer_freeze():
    model = build(freeze_last_layer_steps=3)
    batch = batch_for(model)
    last = "student.head.last_layer.weight_v"
    for s, frozen in ((0, True), (2, True), (3, False)):
        model.zero_grad(set_to_none=True)
        run(model, batch, step=s)["objective"].backward()
        grads = dict(model.student.named_parameters(prefix="student"))
        missing = [n for n, p in grads.items() if n != last and (p.grad is None or not p.grad.abs().sum() > 0)]
        assert not missing, (s, missing)
        g = grads[last].grad
        assert g is not None and (torch.count_nonzero(g) == 0) == frozen, s  # zero (not None) while frozen
        assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    # the gate changes the gradient only, not the value
    torch.testing.assert_close(run(model, batch, step=0)["loss"], run(model, batch, step=5)["loss"])


def test_teacher_and_center_update_and_skip():
    model = build()
    model.set_total_steps(10)
    with torch.no_grad():  # the student moves away from the (identical) teacher
        for p in model.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher0 = [p.clone() for p in model.teacher.parameters()]
    student = [p.detach().clone() for p in model.student.parameters()]
    # forward accumulates the teacher outputs: the batch mean is what the center moves towards
    model.train()
    run(model, batch_for(model))
    assert model.center_count == 2 * B and model.center_sum.abs().sum() > 0
    batch_mean = model.center_sum / (2 * B)
    center0 = model.center.clone()

    model.after_optimizer_step(step_t(4), torch.tensor(True))  # skipped: nothing moves, accumulators emptied
    assert torch.equal(model.center, center0) and model.center_count == 0 and model.center_sum.abs().sum() == 0
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), teacher0))

    model.center_sum.copy_(batch_mean * 2 * B)
    model.center_count.fill_(2 * B)
    model.after_optimizer_step(step_t(4), torch.tensor(False))
    m = float(cosine_schedule(step_t(4), 0.996, 1.0, 10))
    assert 0.996 < m < 1
    for t0, s, t in zip(teacher0, student, model.teacher.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.center, 0.9 * center0 + 0.1 * batch_mean)
    # the last update uses momentum 1: the teacher stops
    before = [p.clone() for p in model.teacher.parameters()]
    model.after_optimizer_step(step_t(9), torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), before))
    # eval mode: no accumulation
    model.eval()
    run(model, batch_for(model))
    assert model.center_count == 0


def test_teacher_temperature_warmup():
    model = build(warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_steps=5)
    temps = [float(model.teacher_temperature(step_t(s))) for s in range(7)]
    assert temps == pytest.approx([0.02, 0.03, 0.04, 0.05, 0.06, 0.06, 0.06])
    assert float(run(model, batch_for(model), step=2)["teacher_temp"]) == pytest.approx(0.04)


# ---------------------------------------------------------------------------------------------------- views


def test_views_one_crop_per_kind_static_shapes(monkeypatch):
    spy = OpSpy(monkeypatch)
    model = build()
    run(model, batch_for(model))
    assert spy.count("random_boxes") == 2 and spy.count("crop_resize") == 2
    (ga, gk, g_out), (la, lk, l_out) = spy.calls["crop_resize"]
    assert gk["backend"] == "reference" and lk["backend"] == "reference"
    assert g_out.shape == (2 * B, 14, 32, 32) and l_out.shape == (L * B, 14, 16, 16)
    for args, out, v in ((ga, g_out, 2), (la, l_out, L)):
        images, boxes, size, box_index = args[:4]
        assert images.shape == (B, 14, 32, 32) and boxes.shape == (v * B, 4) and tuple(size) == out.shape[-2:]
        assert torch.equal(box_index, torch.arange(B).repeat_interleave(v))  # views of a sample are consecutive
    areas = [(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 32**2 for b in (ga[1], la[1])]
    assert ((areas[0] >= 0.4 - 1e-4) & (areas[0] <= 1 + 1e-4)).all()
    assert ((areas[1] >= 0.05 - 1e-4) & (areas[1] <= 0.4 + 1e-4)).all()


def _views(model, monkeypatch, seed=0, n=16):
    """Runs a forward; returns the draws, the crops (before flip/drop) and the views of both kinds."""
    spy = OpSpy(monkeypatch)
    made, real_make, real_draw, noise = [], model.make_views, model.draw_noise, {}
    monkeypatch.setattr(model, "make_views", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])
    monkeypatch.setattr(model, "draw_noise", lambda *a, **k: noise.update(real_draw(*a, **k)) or noise)
    run(model, batch_for(model, n=n), seed)
    crops = [out for _, _, out in spy.calls["crop_resize"]]
    return noise, crops, made


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_flip_and_sensor_drop_per_view(monkeypatch, p):
    model = build(sensor_drop=p, local_crops_number=3)
    noise, crops, views = _views(model, monkeypatch)
    n = 16
    flip, keep = noise["flip"], noise["keep"]  # (n, V), (n, V, M)
    assert flip.shape == (n, 5) and keep.shape == (n, 5, 2)
    assert keep.sum(-1).min() >= 1  # never both sensors
    dropped = keep.sum(-1) < 2
    assert 0 < flip.float().mean() < 1
    assert 0 < dropped.float().mean() < 1 if p < 1 else dropped.all()
    assert 0 < keep[..., 0][dropped].float().mean() < 1  # either sensor can be the dropped one
    chans = {"s1": slice(0, 2), "s2": slice(2, 14)}  # the stack's order: model.modalities
    for kind, (crop, view) in enumerate(zip(crops, views)):
        lo, hi = (0, 2) if kind == 0 else (2, 5)
        v = hi - lo
        for r in range(n * v):
            i, j = divmod(r, v)
            expect = crop[r].flip(-1) if flip[i, lo + j] else crop[r]
            for mi, (m, c) in enumerate(chans.items()):
                if keep[i, lo + j, mi]:
                    assert torch.equal(view[r, c], expect[c]), (kind, r, m)
                else:
                    assert (view[r, c] == 0).all(), (kind, r, m)


def test_no_sensor_drop_without_probability_or_second_modality(monkeypatch):
    noise, _, _ = _views(build(sensor_drop=0.0), monkeypatch, n=4)
    assert "keep" not in noise
    model = build(modalities={"s2": ["B02", "B03", "B04"]})
    noise, _, views = _views(model, monkeypatch, n=4)
    assert "keep" not in noise and views[0].shape == (8, 3, 32, 32)
    noise, _, _ = _views(build(flip=False, local_crops_number=0), monkeypatch, n=4)
    assert set(noise) == {"global_boxes", "keep"}


def test_draws_are_global_batch_rows():
    """Rank 1 of 2 with half the batch draws exactly the second half of the single-process draws."""
    full, half = build(), build()
    half._shard = (1, 2)
    a = full.draw_noise(8, torch.device("cpu"), torch.Generator().manual_seed(3))
    b = half.draw_noise(4, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(b["global_boxes"], a["global_boxes"][8:]) and torch.equal(b["local_boxes"],
                                                                                 a["local_boxes"][4 * L:])
    assert torch.equal(b["flip"], a["flip"][4:]) and torch.equal(b["keep"], a["keep"][4:])


# ---------------------------------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("mods", [["s1"], ["s2"], ["s1", "s2"]])
def test_encode_through_the_teacher_with_missing_channels_zero(mods):
    model = build()
    with torch.no_grad():  # the teacher is the one encoded
        for p in model.teacher.parameters():
            p.add_(0.01)
    batch = batch_for(model)
    out = model.encode({m: batch[m] for m in mods}, mods)
    assert set(out) == {STACK} and out[STACK].shape == (B, 16, 32)
    zeroed = {m: batch[m] if m in mods else torch.zeros_like(batch[m]) for m in model.modalities}
    torch.testing.assert_close(out[STACK], model.encode(zeroed)[STACK])
    torch.testing.assert_close(out[STACK], model.teacher.backbone.encode(batch, mods)[STACK])
    assert not torch.allclose(out[STACK], model.student.backbone.encode(batch, mods)[STACK])
    levels = model.forward_intermediates(batch, mods)
    assert len(levels) == model.feature_levels == 3
    torch.testing.assert_close(levels[-1][STACK], out[STACK])


def test_downstream_backbone_is_the_trainable_teacher_encoder():
    model = build()
    bb = model.downstream_backbone()
    assert isinstance(bb, StackViT) and bb is model.teacher.backbone and bb.cls_token is not None
    assert all(p.requires_grad for p in bb.parameters())


def test_state_dict_holds_teacher_and_center():
    model = build()
    model.set_total_steps(5)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.05)
    model.train()
    run(model, batch_for(model))
    model.after_optimizer_step(step_t(0), torch.tensor(False))
    sd = model.state_dict()
    assert "center" in sd and any(k.startswith("teacher.") for k in sd)
    assert not any(k in sd for k in ("center_sum", "center_count", "channel_modality"))
    fresh = build()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(run(fresh, batch_for(model))["loss"], run(model, batch_for(model))["loss"])


def test_flops_per_sample():
    model = build()
    full = model.flops_per_sample()
    assert full > model.flops_per_sample(training=False) > 0
    assert build(local_crops_number=4).flops_per_sample() > full


def test_set_backend():
    model = build(ops_backend="auto")
    model.set_backend("reference")
    assert model.cfg.ops_backend == "reference"
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend"))


# ---------------------------------------------------------------------------------------------------- tracing


def test_train_step_has_no_host_sync():
    """Forward, backward, per-parameter clipping, scheduled weight decay, AdamW and the EMA hook: device only."""
    cfg = load_config(PretrainConfig, "dino_mm_tiny", [f"model.{k}={v}" for k, v in SMALL.items()])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    step = TrainStep(model, build_optimizer(model, cfg.optim), device=torch.device("cpu"), optim_cfg=cfg.optim,
                     total_steps=4, generator=torch.Generator().manual_seed(0))
    teacher = [p.clone() for p in model.teacher.parameters()]
    with forbid_host_sync():
        step([batch_for(model)])
        step([batch_for(model, seed=1)])
    assert step.read_metrics()["skipped_steps"] == 0
    assert model.center.abs().sum() > 0 and model.center_count == 0
    assert any(not torch.equal(a, b) for a, b in zip(model.teacher.parameters(), teacher))


def test_forward_traces_with_no_break_but_the_draws():
    model = build()
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(batch_for(model), generator=torch.Generator().manual_seed(0),
                                                 step=step_t(0))
    finally:
        torch._dynamo.reset()
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert all("draw_noise" in r for r in reasons), reasons
    assert explained.graph_break_count <= 1 and explained.graph_count == explained.graph_break_count + 1


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override,key", [
    ("model.depth=0", "model.depth"),
    ("model.num_heads=5", "model.num_heads"),
    ("model.out_dim=0", "model.out_dim"),
    ("model.head_bottleneck_dim=0", "model.head_bottleneck_dim"),
    ("model.local_crops_number=-1", "model.local_crops_number"),
    ("model.local_crop_size=50", "model.local_crop_size"),
    ("model.local_crop_size=128", "model.local_crop_size"),
    ("model.global_crop_scale=[0.5, 0.4]", "model.global_crop_scale"),
    ("model.local_crop_scale=[0.0, 0.4]", "model.local_crop_scale"),
    ("model.sensor_drop=1.5", "model.sensor_drop"),
    ("model.student_temp=0", "model.student_temp"),
    ("model.teacher_temp=-0.1", "model.teacher_temp"),
    ("model.warmup_teacher_temp_steps=-1", "model.warmup_teacher_temp_steps"),
    ("model.momentum_teacher=1.5", "model.momentum_teacher"),
    ("model.center_momentum=-0.1", "model.center_momentum"),
    ("model.freeze_last_layer_steps=-1", "model.freeze_last_layer_steps"),
    ("model.decoder_dim=32", "model.decoder_dim"),  # another model's key
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(PretrainConfig, "dino_mm_tiny", [override])


@pytest.mark.parametrize("name", ["dino_mm_tiny", "dino_mm_small", "dino_mm_base"])
def test_builtin_configs(name):
    cfg = load_config(PretrainConfig, name)
    assert cfg.model.name == "dino_mm" and cfg.optim.grad_clip_mode == "per_parameter"
    assert cfg.optim.weight_decay == 0.04 and cfg.optim.weight_decay_end == 0.4 and cfg.optim.grad_clip == 3.0


# ---------------------------------------------------------------------------------------------------- overfit


def test_short_overfit_lowers_the_loss():
    """With the teacher and the center held (momentum 1) the loss is a fixed function of the student: 30 AdamW
    steps on one batch with fixed views (the same seed every step) bring the student to the teacher, i.e. the
    loss down towards its bound, the teacher entropy (loss - entropy = the mean KL(teacher || student)). With
    DINO's moving teacher and center the loss is no such measure: it rises as centering flattens the targets."""
    model = build(freeze_last_layer_steps=0, momentum_teacher=1.0, center_momentum=1.0)
    model.set_total_steps(30)
    model.train()
    batch = batch_for(model, n=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    kl = []
    for s in range(30):
        out = run(model, batch, seed=0, step=s)
        opt.zero_grad()
        out["objective"].backward()
        opt.step()
        model.after_optimizer_step(step_t(s), torch.tensor(False))
        kl.append(float(out["loss"].detach() - out["teacher_entropy"]))
    assert all(math.isfinite(x) and x >= -1e-4 for x in kl), kl
    assert min(kl[-5:]) < 0.6 * kl[0], kl
    assert run(model, batch, seed=0)["loss"] < 0.85 * (kl[0] + float(out["teacher_entropy"]))
