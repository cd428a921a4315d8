"""The channel-stack baselines (SatViT on StackViT), Fus-MAE as a configuration of the paper's model, and the
paper's model's comparison options (sensor_drop, encoder_fusion, decoder_context)."""

import dataclasses

import pytest
import torch

from mmfuse_fast.config import ConfigError, FinetuneConfig, PretrainConfig, load_config
from mmfuse_fast.models import MODELS, FusMAE, MMFuseMAE, SatViT, StackViT, build_model
from mmfuse_fast.models.contract import STACK, Backbone, PretrainModel, downstream_backbone, token_sets
from mmfuse_fast.models.satvit import SatViTConfig

from _model_helpers import OpSpy, random_batch, small_cfg

SATVIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1,
              decoder_heads=2, ops_backend="reference")


def satvit(**overrides) -> SatViT:
    torch.manual_seed(0)
    return SatViT(SatViTConfig(**{**SATVIT, **overrides}))


def run(model, batch, seed=0):
    return model(batch, generator=torch.Generator().manual_seed(seed))


def test_registry_and_shipped_configs():
    assert {"mmfuse", "satvit", "fus_mae"} <= set(MODELS)
    for name in ("satvit", "fus_mae"):
        for scale in ("tiny", "small", "base"):
            cfg = load_config(PretrainConfig, f"{name}_{scale}")
            assert cfg.model.name == name
    fus = load_config(PretrainConfig, "fus_mae_tiny").model
    assert (fus.stem_depth, fus.caf_depth, fus.contrastive, fus.decoder_context) == (0, 1, False, "others")
    assert isinstance(build_model(dataclasses.replace(fus, ops_backend="reference")), FusMAE)


def test_model_specific_keys_are_validated_against_the_named_model():
    with pytest.raises(ConfigError, match="model.caf"):  # a key of the paper's model, not SatViT's
        load_config(PretrainConfig, "satvit_tiny", ["model.caf=false"])
    with pytest.raises(ConfigError, match="model.depth"):
        load_config(PretrainConfig, "satvit_tiny", ["model.depth=0"])
    with pytest.raises(ConfigError, match="model.name.*'nope'"):
        load_config(PretrainConfig, None, ["model.name=nope"])
    for key, value in (("sensor_drop", 1.0), ("encoder_fusion", "mixed"), ("decoder_context", "none")):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            load_config(PretrainConfig, None, [f"model.{key}={value}"])
    with pytest.raises(ConfigError, match="model.sensor_drop"):
        load_config(PretrainConfig, None, ["model.sensor_drop=0.5", "model.modalities={s1: [VV, VH]}"])


# ---------------------------------------------------------------------------------------------------- SatViT


def test_satvit_forward_masks_the_channel_stack():
    model, batch = satvit(), random_batch(small_cfg())
    out = run(model, batch)
    assert isinstance(model, PretrainModel) and isinstance(model, Backbone)
    assert out["pred"].shape == (4, 16, 8 * 8 * 14) and out["mask"].shape == (4, 16)
    assert (out["mask"].sum(1) == 12).all() and model.n_keep == 4
    assert torch.isfinite(out["objective"]) and out["objective"] is out["loss"]
    assert all(blk.attn.qkv.bias is None for blk in model.encoder.blocks)  # SatViT: no qkv bias
    assert model.encoder.cls_token is None
    out["loss"].backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_satvit_loss_is_the_masked_normalized_mse():
    from mmfuse_fast.models.mae import patchify

    model, batch = satvit(), random_batch(small_cfg())
    out = run(model, batch)
    target = patchify(torch.cat([batch["s1"], batch["s2"]], 1), 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out["pred"] - target) ** 2).mean(-1)
    expected = (per_patch * out["mask"]).sum() / out["mask"].sum()
    torch.testing.assert_close(out["loss"], expected)


def test_satvit_every_attention_goes_through_the_op(monkeypatch):
    spy = OpSpy(monkeypatch)
    run(satvit(), random_batch(small_cfg()))
    assert spy.count("modality_attention") == 2 + 1  # encoder blocks + decoder block


def test_satvit_traces_as_one_graph():
    explained = torch._dynamo.explain(satvit())(random_batch(small_cfg()), generator=torch.Generator().manual_seed(0))
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]


# ---------------------------------------------------------------------------------------------------- channel stack


@pytest.mark.parametrize("mods", [["s1"], ["s2"], ["s1", "s2"]])
def test_stack_backbone_zeroes_the_missing_modality(mods):
    model, batch = satvit(), random_batch(small_cfg())
    model.eval()
    backbone = downstream_backbone(model)
    assert isinstance(backbone, StackViT) and backbone.missing_modality == "zero"
    assert token_sets(backbone, mods) == (STACK,)
    got = backbone.encode({m: batch[m] for m in mods}, mods)
    assert set(got) == {STACK} and got[STACK].shape == (4, 16, 32)
    zeroed = {m: batch[m] if m in mods else torch.zeros_like(batch[m]) for m in ("s1", "s2")}
    torch.testing.assert_close(got[STACK], backbone.encode(zeroed)[STACK])
    levels = backbone.forward_intermediates({m: batch[m] for m in mods}, mods)
    assert len(levels) == backbone.feature_levels == 3
    torch.testing.assert_close(levels[-1][STACK], got[STACK])


def test_stack_backbone_with_cls_returns_patch_tokens_and_resamples_positions():
    torch.manual_seed(0)
    vit = StackViT({"s1": ["VV", "VH"], "s2": ["B02"]}, 32, 8, 16, 1, 2, cls_token=True, backend="reference")
    batch = {"s1": torch.randn(2, 2, 32, 32), "s2": torch.randn(2, 1, 32, 32)}
    assert vit.encode(batch)[STACK].shape == (2, 16, 16)
    assert vit.embed(torch.randn(2, 3, 16, 16)).shape == (2, 4, 16)  # a 16 px crop: 2 x 2 grid
    torch.testing.assert_close(vit.pos_embed_for(4), vit.pos_embed)


def test_unknown_modality_is_named():
    with pytest.raises(ValueError, match="unknown modality 'hsi'"):
        satvit().encode(random_batch(small_cfg()), ["hsi"])
    with pytest.raises(ValueError, match="unknown modality 'hsi'"):
        MMFuseMAE(small_cfg()).encode(random_batch(small_cfg()), ["hsi"])


# ---------------------------------------------------------------------------------------------------- options


def build(**overrides):
    torch.manual_seed(0)
    return MMFuseMAE(small_cfg(**overrides))


def test_separate_encoder_keeps_modalities_apart():
    """Without CAF and with encoder_fusion=separate, the encoded S2 tokens do not depend on S1 at all."""
    model = build(caf=False, encoder_fusion="separate").eval()
    batch = random_batch(small_cfg())
    other = dict(batch, s1=torch.randn_like(batch["s1"]))
    torch.testing.assert_close(model.encode(batch)["s2"], model.encode(other)["s2"])
    joint = build(caf=False).eval()
    assert not torch.allclose(joint.encode(batch)["s2"], joint.encode(other)["s2"])


def test_decoder_context_others_hides_the_own_modality(monkeypatch):
    spy = OpSpy(monkeypatch)
    run(build(decoder_context="others"), random_batch(small_cfg()))
    cross = [a for a in spy.attention_allows() if a is not None and a.shape == (1, 2)]
    assert [a.tolist() for a in cross] == [[[False, True]], [[True, False]]]


def test_fus_mae_flops_count_fewer_context_pairs_than_all():
    cfg = small_cfg(stem_depth=0, contrastive=False)
    assert MMFuseMAE(dataclasses.replace(cfg, decoder_context="others")).flops_per_sample() < \
        MMFuseMAE(cfg).flops_per_sample()


def test_sensor_drop_removes_a_modality_from_the_fusion():
    """With sensor_drop near 1 every sample drops one modality: nothing else sees it, and its reconstruction does
    not count, so changing a dropped modality's pixels changes neither the other modality's prediction nor the
    reconstruction loss."""
    model = build(sensor_drop=0.999, contrastive=False)
    batch = random_batch(small_cfg())
    noise = model.draw_noise(4, "cpu", torch.Generator().manual_seed(0))
    keep = noise["keep"]
    assert keep.shape == (4, 2) and (keep.sum(1) == 1).all()
    dropped = {m: (keep[:, i] == 0) for i, m in enumerate(("s1", "s2"))}
    base = run(model, batch)
    for i, m in enumerate(("s1", "s2")):
        other = "s2" if m == "s1" else "s1"
        changed = dict(batch, **{m: torch.where(dropped[m][:, None, None, None], torch.randn_like(batch[m]),
                                                batch[m])})
        out = run(model, changed)
        torch.testing.assert_close(out["pred"][other], base["pred"][other])
        torch.testing.assert_close(out["loss_rec"], base["loss_rec"])


def test_sensor_drop_has_no_host_sync():
    from mmfuse_fast.engine.step import forbid_host_sync

    model, batch = build(sensor_drop=0.5), random_batch(small_cfg())
    batch = {m: batch[m] for m in model.modalities}
    with forbid_host_sync():
        run(model, batch)["objective"].backward()


def test_sensor_drop_off_draws_nothing_more():
    model = build()
    assert "keep" not in model.draw_noise(4, "cpu", torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------- engine bits


def test_per_parameter_clipping_clips_each_gradient_alone():
    from mmfuse_fast.engine.step import clip_grad_norm_per_parameter_

    grads = [torch.full((4,), 3.0), torch.full((2,), 0.1)]
    total = clip_grad_norm_per_parameter_(grads, 1.0)
    assert total == pytest.approx((4 * 9 + 2 * 0.01) ** 0.5)
    assert grads[0].norm() == pytest.approx(1.0, rel=1e-5) and torch.equal(grads[1], torch.full((2,), 0.1))


def test_new_keys_at_their_defaults_leave_the_config_hash_unchanged():
    from mmfuse_fast.engine.checkpoint import config_hash

    base = load_config(PretrainConfig, "tiny")
    same = load_config(PretrainConfig, "tiny", ["model.sensor_drop=0.0", "optim.grad_clip_mode=global"])
    other = load_config(PretrainConfig, "tiny", ["model.sensor_drop=0.1"])
    assert config_hash(base) == config_hash(same) != config_hash(other)
    # the hashes the configs had before these keys existed: runs started then still resume
    assert config_hash(base) == "c69549b1abab05f1"
    assert config_hash(load_config(FinetuneConfig, None)) == "8c860490c55edbde"
