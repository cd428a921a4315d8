import math

import pytest
import torch

from mmfuse_fast.config import ModelConfig, PretrainConfig, load_config
from mmfuse_fast.models import MODELS, MMFuseMAE, build_model, register_model

from _model_helpers import OpSpy, random_batch, small_cfg

N, KEEP = 16, 4  # small_cfg: (32 / 8)**2 patches, mask ratio 0.75


def run(model, batch, seed=0):
    return model(batch, generator=torch.Generator().manual_seed(seed))


def build(**overrides):
    torch.manual_seed(0)
    return MMFuseMAE(small_cfg(**overrides))


# ---------------------------------------------------------------------------------------------------- shapes


def test_forward_shapes_and_visible_counts():
    cfg = small_cfg()
    model = build()
    out = run(model, random_batch(cfg))
    assert set(out) >= {"loss", "loss_rec", "loss_con", "pred", "mask"}
    assert out["pred"]["s1"].shape == (4, N, 8 * 8 * 2) and out["pred"]["s2"].shape == (4, N, 8 * 8 * 12)
    for m in ("s1", "s2"):
        assert out["mask"][m].shape == (4, N)
        assert (out["mask"][m].sum(1) == N - KEEP).all()
    for k in ("loss", "loss_rec", "loss_con"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    assert model.n_keep == KEEP


def test_masks_consistent_vs_independent():
    batch = random_batch(small_cfg())
    ind = run(build(consistent_mask=False), batch)["mask"]
    con = run(build(consistent_mask=True), batch)["mask"]
    assert torch.equal(con["s1"], con["s2"])
    assert not torch.equal(ind["s1"], ind["s2"])


def test_generator_makes_forward_reproducible():
    model, batch = build(), random_batch(small_cfg())
    a, b, c = run(model, batch, 1), run(model, batch, 1), run(model, batch, 2)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["mask"]["s2"], b["mask"]["s2"])
    assert not torch.equal(a["mask"]["s2"], c["mask"]["s2"])


def test_forward_traces_as_one_graph():
    """`--compile`: the random draws run eagerly first (draw_noise), everything after them is one graph."""
    cfg = small_cfg()
    explained = torch._dynamo.explain(build())(random_batch(cfg), generator=torch.Generator().manual_seed(0))
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_every_parameter_gets_a_gradient():
    model = build()
    run(model, random_batch(small_cfg()))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


# ---------------------------------------------------------------------------------------------------- ops use


def test_every_attention_goes_through_modality_attention(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("SDPA must not be called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)
    spy = OpSpy(monkeypatch)
    cfg = small_cfg(stem_depth=2, caf_depth=2, encoder_depth=3, decoder_depth=2)
    torch.manual_seed(0)
    run(MMFuseMAE(cfg), random_batch(cfg))
    per_encoder_pass = 2 * cfg.stem_depth + cfg.caf_depth + cfg.encoder_depth
    per_decoders = 2 * (1 + cfg.decoder_depth)  # CMF cross block + decoder blocks, per modality
    assert spy.count("modality_attention") == 2 * per_encoder_pass + per_decoders  # full view + crop view
    for args, kwargs, _ in spy.calls["modality_attention"]:
        assert kwargs["backend"] == "reference"
    assert spy.count("multiscale_infonce") == 1 and spy.count("random_boxes") == 1
    assert spy.count("crop_resize") == 2


def caf_calls(spy):
    return [a for a in spy.attention_allows() if a is not None and torch.equal(a, ~torch.eye(2, dtype=torch.bool))]


def test_caf_switch(monkeypatch):
    spy = OpSpy(monkeypatch)
    batch = random_batch(small_cfg())
    on, off = build(caf=True), build(caf=False)
    out_on = run(on, batch)
    assert len(caf_calls(spy)) == 2  # one CAF block, full + crop views
    spy.calls["modality_attention"].clear()
    out_off = run(off, batch)
    assert len(caf_calls(spy)) == 0
    assert any(k.startswith("caf_blocks.") for k in on.state_dict())
    assert not any(k.startswith("caf_blocks.") for k in off.state_dict())
    assert not torch.allclose(out_on["pred"]["s2"], out_off["pred"]["s2"])


def test_cmf_switch(monkeypatch):
    spy = OpSpy(monkeypatch)
    batch = random_batch(small_cfg())
    on, off = build(cmf=True), build(cmf=False)
    run(on, batch)
    n_on = spy.count("modality_attention")
    cross = [a for a, k, _ in spy.calls["modality_attention"] if list(a[3]) == [N] and list(a[4]) == [KEEP, KEEP]]
    assert len(cross) == 2  # one CMF cross-attention per decoder, to both modalities' visible tokens
    spy.calls["modality_attention"].clear()
    out_off = run(off, batch)
    assert spy.count("modality_attention") == n_on - 2
    assert any(".cmf." in k for k in on.state_dict()) and not any("cmf" in k for k in off.state_dict())
    assert not torch.allclose(run(on, batch)["pred"]["s2"], out_off["pred"]["s2"])


def test_cmf_decoder_sees_other_modalities():
    model = build(cmf=True)
    dec = model.decoders["s2"]
    latent = torch.randn(2, KEEP, 32)
    restore = torch.argsort(torch.rand(2, N), 1)
    ctx_a, ctx_b = torch.randn(2, 2 * KEEP, 32), torch.randn(2, 2 * KEEP, 32)
    assert not torch.allclose(dec(latent, restore, ctx_a, [KEEP, KEEP]), dec(latent, restore, ctx_b, [KEEP, KEEP]))
    plain = build(cmf=False).decoders["s2"]
    assert plain(latent, restore).shape == (2, N, 8 * 8 * 12)


def test_contrastive_switch(monkeypatch):
    spy = OpSpy(monkeypatch)
    batch = random_batch(small_cfg())
    out = run(build(contrastive=False), batch)
    assert out["loss_con"].item() == 0.0 and torch.equal(out["loss"], out["loss_rec"])
    assert spy.count("crop_resize") == spy.count("random_boxes") == spy.count("multiscale_infonce") == 0
    assert not any(k.startswith("proj_heads") for k in build(contrastive=False).state_dict())
    out = run(build(contrastive=True), batch)
    assert out["loss_con"].item() > 0


@pytest.mark.parametrize("scale", [[0.3, 0.3], [0.7, 0.7], [0.4, 0.6]])
def test_crop_ratio_sets_box_area(monkeypatch, scale):
    spy = OpSpy(monkeypatch)
    cfg = small_cfg(crop_scale=scale)
    torch.manual_seed(0)
    run(MMFuseMAE(cfg), random_batch(cfg, batch=16))
    (args, kwargs, boxes), = spy.calls["random_boxes"]
    assert tuple(kwargs["scale"]) == tuple(scale)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / cfg.img_size**2
    assert ((area > scale[0] - 1e-4) & (area < scale[1] + 1e-4)).all()
    if scale[0] == scale[1]:
        torch.testing.assert_close(area, torch.full_like(area, scale[0]), atol=1e-4, rtol=0)
    else:
        assert area.std() > 0.01
    # the same box for every modality of a scene
    crop_boxes = [a[1] if len(a) > 1 else k["boxes"] for a, k, _ in spy.calls["crop_resize"]]
    assert len(crop_boxes) == 2 and torch.equal(crop_boxes[0], crop_boxes[1]) and torch.equal(crop_boxes[0], boxes)


def test_contrastive_weight_changes_total_loss():
    batch = random_batch(small_cfg())
    a = run(build(contrastive_weight=0.5), batch)
    b = run(build(contrastive_weight=2.0), batch)
    torch.testing.assert_close(a["loss_rec"], b["loss_rec"])
    torch.testing.assert_close(a["loss_con"], b["loss_con"])
    torch.testing.assert_close(a["loss"], a["loss_rec"] + 0.5 * a["loss_con"])
    torch.testing.assert_close(b["loss"], b["loss_rec"] + 2.0 * b["loss_con"])
    assert b["loss"] > a["loss"]


def test_norm_pix_loss_switch():
    batch = random_batch(small_cfg())
    batch = {**batch, "s2": batch["s2"] * 5 + 3}
    a = run(build(norm_pix_loss=True), batch)["loss_rec"]
    b = run(build(norm_pix_loss=False), batch)["loss_rec"]
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------------- encode


def test_encode_all_and_subset():
    model, batch = build(), random_batch(small_cfg())
    feats = model.encode(batch)
    assert set(feats) == {"s1", "s2"} and all(f.shape == (4, N, 32) for f in feats.values())
    s1 = model.encode({"s1": batch["s1"]}, modalities=["s1"])
    assert set(s1) == {"s1"} and s1["s1"].shape == (4, N, 32)
    assert not torch.allclose(s1["s1"], feats["s1"])  # fusion with S2 changes the S1 tokens
    with pytest.raises(ValueError, match="unknown modality 'rgb'"):
        model.encode(batch, modalities=["rgb"])


def test_single_modality_model():
    cfg = small_cfg(modalities={"s2": ["B02", "B03", "B04"]})
    torch.manual_seed(0)
    out = run(MMFuseMAE(cfg), random_batch(cfg))
    assert out["pred"]["s2"].shape == (4, N, 8 * 8 * 3) and torch.isfinite(out["loss"])


@pytest.mark.parametrize("bad,match", [
    (lambda b: {k: v for k, v in b.items() if k != "s2"}, r"missing modality 's2'.*B01"),
    (lambda b: {**b, "s1": b["s1"][:, :1]}, r"batch\['s1'\].*\(B, 2, 32, 32\).*VV"),
    (lambda b: {**b, "s2": b["s2"][..., :16]}, r"batch\['s2'\].*\(B, 12, 32, 32\)"),
    (lambda b: {**b, "s1": b["s1"].long()}, r"batch\['s1'\] must be a float tensor"),
    (lambda b: {**b, "s1": [1, 2]}, r"batch\['s1'\] must be a float tensor.*list"),
    (lambda b: {**b, "s1": b["s1"][:2]}, r"different batch sizes"),
])
def test_bad_batches_raise_clear_errors(bad, match):
    model, batch = build(), random_batch(small_cfg())
    with pytest.raises(ValueError, match=match):
        model(bad(batch))


# ---------------------------------------------------------------------------------------------------- misc


def test_state_dict_independent_of_backend():
    dicts = {b: build(ops_backend=b).state_dict() for b in ("auto", "reference", "triton")}
    keys = {b: [(k, tuple(v.shape)) for k, v in d.items()] for b, d in dicts.items()}
    assert keys["auto"] == keys["reference"] == keys["triton"]
    assert not any("caf_allow" in k or "pos_embed" in k for k in dicts["auto"])
    model_auto = build(ops_backend="auto")
    model_auto.load_state_dict(dicts["reference"])
    batch = random_batch(small_cfg())
    ref = build(ops_backend="reference")
    torch.testing.assert_close(run(model_auto, batch)["loss"], run(ref, batch)["loss"])
    model_auto.set_backend("reference")
    assert all(m.backend == "reference" for m in model_auto.modules() if hasattr(m, "backend"))


def test_patchify_roundtrip_and_visualize():
    model, batch = build(), random_batch(small_cfg())
    p = model.patchify("s2", batch["s2"])
    assert p.shape == (4, N, 8 * 8 * 12)
    torch.testing.assert_close(model.unpatchify("s2", p), batch["s2"])
    vis = model.visualize(batch, generator=torch.Generator().manual_seed(0))
    for m in ("s1", "s2"):
        assert set(vis[m]) == {"input", "masked", "reconstruction"}
        for img in vis[m].values():
            assert img.shape == batch[m].shape
        mask = run(model, batch, 0)["mask"][m].bool()  # same generator seed -> same mask
        visible = model.patchify(m, vis[m]["reconstruction"])[~mask]
        torch.testing.assert_close(visible, model.patchify(m, batch[m])[~mask])
        assert (model.patchify(m, vis[m]["masked"])[mask] == 0).all()


def test_registry_and_build_model():
    cfg = load_config(PretrainConfig, "tiny").model
    assert isinstance(build_model(cfg), MMFuseMAE) and MODELS["mmfuse"] is MMFuseMAE
    with pytest.raises(ValueError, match=r"model\.name 'nope'.*mmfuse"):
        build_model(ModelConfig(name="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_model("mmfuse")(torch.nn.Linear)


def test_flops_per_sample():
    full = build().flops_per_sample()
    assert full > 0 and build(caf=False).flops_per_sample() < full
    assert build(contrastive=False).flops_per_sample() < full
    assert math.isclose(build().flops_per_sample(training=False) * 3, full)
