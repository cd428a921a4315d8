"""The downstream recipe: label fractions drawn with their own seed and stratified (iterative stratification for
multi-label, per class for scene labels, labels read without decoding images), layer ids and layer-wise lr scales
for every backbone kind, applied on the device by the TrainStep, stochastic depth in the blocks, and a full
fine-tune through `finetune` with the shipped `finetune_full` recipe."""

import json
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mmfuse_fast.config import ConfigError, FinetuneConfig, PretrainConfig, load_config, resolve_config_path
from mmfuse_fast.data import BIGEARTHNET_CLASSES
from mmfuse_fast.engine import finetune, read_metrics
from mmfuse_fast.engine.finetune import (draw_label_subset, iterative_stratification, per_class_subset)
from mmfuse_fast.engine.optim import build_optimizer, layer_ids, param_groups
from mmfuse_fast.engine.schedule import lr_at
from mmfuse_fast.engine.step import TrainStep, forbid_host_sync
from mmfuse_fast.engine.tasks import TaskObjective, build_classifier, get_task
from mmfuse_fast.errors import CheckpointError
from mmfuse_fast.models import build_model
from mmfuse_fast.models.contract import downstream_backbone
from mmfuse_fast.models.layers import Block, encoder_layers, set_drop_path

from conftest import TINY, SyntheticBEN, tiny_model_overrides

finetune_module = sys.modules["mmfuse_fast.engine.finetune"]


def _rare_multilabel(n=200, seed=0):
    """(n, 19) labels: common classes, class 16 absent, classes 17 and 18 with 2 and 1 positives."""
    rng = np.random.default_rng(seed)
    p = np.array([0.4, 0.3, 0.3, 0.2, 0.2, 0.15, 0.1, 0.1, 0.08, 0.06, 0.05, 0.05, 0.04, 0.04, 0.03, 0.03,
                  0.0, 0.0, 0.0])
    y = rng.random((n, 19)) < p
    y[[5, 77], 17] = True
    y[123, 18] = True
    return y


# --- the label-fraction draw ---------------------------------------------------------------------------------


def test_iterative_stratification_keeps_every_present_class():
    y = _rare_multilabel()
    present = y.sum(0) > 0
    for fraction in (0.05, 0.1, 0.3):
        k = max(1, round(fraction * len(y)))
        idx = draw_label_subset(len(y), fraction, 7, y, "iterative_stratification")
        assert len(idx) == len(set(idx)) == k and idx == sorted(idx)
        counts = y[idx].sum(0)
        assert (counts[present] >= 1).all(), fraction  # rare classes 17 (2 positives) and 18 (1) included
        assert counts[16] == 0
    # proportions of the common classes follow the fraction
    idx = draw_label_subset(len(y), 0.3, 7, y, "iterative_stratification")
    common = y.sum(0) >= 20
    share = y[idx].sum(0)[common] / y.sum(0)[common]
    assert np.abs(share - 0.3).max() < 0.08


def test_stratified_draw_is_deterministic_in_its_seed():
    y = _rare_multilabel()
    a = draw_label_subset(len(y), 0.1, 3, y, "iterative_stratification")
    assert a == draw_label_subset(len(y), 0.1, 3, y, "iterative_stratification")
    assert a != draw_label_subset(len(y), 0.1, 4, y, "iterative_stratification")
    assert draw_label_subset(len(y), 1.0, 3, y, "iterative_stratification") == list(range(len(y)))
    # k too small to cover the 18 present classes: the size wins
    assert len(iterative_stratification(y, 4, 0)) == 4 and len(iterative_stratification(y, 1, 0)) == 1
    with pytest.raises(ValueError, match="label_fraction"):
        draw_label_subset(len(y), 0.0, 0, y, "iterative_stratification")


def test_per_class_draw_for_scene_labels():
    labels = np.repeat(np.arange(6), [100, 50, 10, 2, 1, 0][:6])
    labels = np.random.default_rng(1).permutation(labels)
    n = len(labels)  # 163
    idx = draw_label_subset(n, 0.1, 5, labels, "per_class")
    assert len(idx) == round(0.1 * n) == 16
    counts = np.bincount(labels[idx], minlength=6)
    assert (counts[:5] >= 1).all() and counts[5] == 0
    assert counts[0] >= counts[1] >= counts[2]  # proportional beyond the one each
    assert idx == draw_label_subset(n, 0.1, 5, labels, "per_class")
    assert idx != draw_label_subset(n, 0.1, 6, labels, "per_class")
    # fewer samples than classes: the largest classes get one each
    assert sorted(labels[per_class_subset(labels, 2, 0)].tolist()) == [0, 1]


def test_random_draw_for_segmentation_is_the_seeded_permutation():
    g = torch.Generator().manual_seed(9)
    assert draw_label_subset(50, 0.2, 9) == sorted(torch.randperm(50, generator=g)[:10].tolist())


class LabelsOnlyBEN(SyntheticBEN):
    """SyntheticBEN with a metadata `labels` array (as the BigEarthNet readers have); counts decoded samples."""

    def __init__(self, labels):
        super().__init__(n=len(labels))
        self.labels = labels.astype(np.float32)
        self.decoded = 0

    def __getitem__(self, i):
        self.decoded += 1
        return super().__getitem__(i) | {"label": torch.from_numpy(self.labels[i])}


def _ft_cfg(*extra):
    return load_config(FinetuneConfig, None, list(extra))


def _info():
    return {"task": "multilabel", "num_classes": 19, "classes": list(BIGEARTHNET_CLASSES)}


def test_label_subset_record_reads_labels_cheaply(tmp_path):
    y = _rare_multilabel()
    data = LabelsOnlyBEN(y)
    run = tmp_path / "run"
    run.mkdir()
    cfg = _ft_cfg("label_fraction=0.05", "label_seed=2")
    indices = finetune_module._label_subset(data, cfg, run, False, _info())
    assert data.decoded == 0  # labels from the `labels` array, no sample read
    record = json.loads((run / "label_subset.json").read_text())
    assert record["label_seed"] == 2 and record["method"] == "iterative_stratification"
    assert record["indices"] == indices and record["n_selected"] == 10 and record["n_total"] == 200
    assert record["ids"] == [data.ids[i] for i in indices]
    counts = record["class_counts"]
    assert counts["classes"] == list(BIGEARTHNET_CLASSES)
    assert counts["full"] == y.sum(0).tolist() and counts["subset"] == y[indices].sum(0).tolist()
    assert record["missing_classes"] == []

    # independent of train.seed; label_seed changes it
    same = finetune_module._label_subset(data, _ft_cfg("label_fraction=0.05", "label_seed=2", "train.seed=11"),
                                         tmp_path, False, _info())
    other = finetune_module._label_subset(data, _ft_cfg("label_fraction=0.05", "label_seed=3"), tmp_path, False,
                                          _info())
    assert same == indices and other != indices
    # resuming with another draw is refused; with the same one it passes
    finetune_module._label_subset(data, cfg, run, True, _info())
    with pytest.raises(CheckpointError, match="label_seed"):
        finetune_module._label_subset(data, _ft_cfg("label_fraction=0.05", "label_seed=3"), run, True, _info())


def test_label_subset_falls_back_to_samples_and_scene_counts(tmp_path):
    class Scene(Dataset):
        classes = [f"c{i}" for i in range(4)]

        def __init__(self):
            self.y = np.repeat(np.arange(4), [20, 10, 3, 1])
            self.ids = [f"s{i}" for i in range(len(self.y))]
            self.decoded = 0

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):  # no `labels` array: the draw reads the samples
            self.decoded += 1
            return {"label": torch.tensor(int(self.y[i])), "id": self.ids[i]}

    data = Scene()
    cfg = _ft_cfg("task=scene", "label_fraction=0.25")
    info = {"task": "scene", "num_classes": 4, "classes": data.classes}
    indices = finetune_module._label_subset(data, cfg, tmp_path, False, info)
    record = json.loads((tmp_path / "label_subset.json").read_text())
    assert record["method"] == "per_class" and len(indices) == round(0.25 * 34)
    assert record["class_counts"] == {"classes": data.classes, "full": [20, 10, 3, 1],
                                      "subset": np.bincount(data.y[indices], minlength=4).tolist()}
    assert min(record["class_counts"]["subset"]) >= 1
    assert data.decoded == 34
    # everything kept: nothing to draw, and no sample is read just for the counts
    assert finetune_module._label_subset(data, _ft_cfg("task=scene"), tmp_path, False, info) == list(range(34))
    record = json.loads((tmp_path / "label_subset.json").read_text())
    assert data.decoded == 34 and "class_counts" not in record
    seg = finetune_module._label_subset(data, _ft_cfg("task=segmentation", "label_fraction=0.25"), tmp_path, False,
                                        {"task": "segmentation", "num_classes": 4, "classes": None})
    record = json.loads((tmp_path / "label_subset.json").read_text())
    assert record["method"] == "random" and "class_counts" not in record and len(seg) == 8


def test_finetune_config_keys_are_validated():
    for key, value in (("label_seed", -1), ("layer_decay", 0.0), ("layer_decay", 1.5), ("drop_path", 1.0)):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            _ft_cfg(f"{key}={value}")
    assert resolve_config_path("finetune_full").is_file() and resolve_config_path("finetune_linear").is_file()
    linear = load_config(FinetuneConfig, "finetune_linear")
    assert linear.optim == FinetuneConfig().optim and linear.mode == "linear"
    full = load_config(FinetuneConfig, "finetune_full")
    assert (full.mode, full.layer_decay, full.drop_path, full.optim.weight_decay, full.optim.betas) == \
        ("full", 0.75, 0.1, 0.05, [0.9, 0.999])


# --- layer ids and lr scales ---------------------------------------------------------------------------------


def _backbone(name, *extra):
    cfg = load_config(PretrainConfig, None, tiny_model_overrides(name) + list(extra))
    return downstream_backbone(build_model(cfg.model)), cfg


def test_layer_ids_of_the_papers_model_and_fus_mae():
    backbone, _ = _backbone("mmfuse", "model.stem_depth=2", "model.caf_depth=1", "model.encoder_depth=2")
    ids, depth = layer_ids(backbone)
    assert depth == 5  # 2 stem depths (s1 and s2 share them) + 1 CAF + 2 encoder blocks
    assert ids["stem.s1.0.attn.qkv.weight"] == ids["stem.s2.0.attn.qkv.weight"] == 1
    assert ids["stem.s1.1.mlp.fc2.bias"] == ids["stem.s2.1.norm1.weight"] == 2
    assert ids["caf_blocks.0.attn.proj.weight"] == 3
    assert ids["blocks.0.norm2.weight"] == 4 and ids["blocks.1.mlp.fc1.weight"] == 5
    assert ids["tokenizers.s1.patch_embed.proj.weight"] == ids["tokenizers.s2.modality_embed"] == 0
    assert ids["norm.weight"] == depth + 1
    # the pretraining decoder's blocks are not encoder layers
    assert all(v == depth + 1 for k, v in ids.items() if k.startswith("decoders."))

    backbone, _ = _backbone("fus_mae")
    ids, depth = layer_ids(backbone)
    assert depth == 2 and ids["caf_blocks.0.attn.qkv.weight"] == 1 and ids["blocks.0.attn.qkv.weight"] == 2


@pytest.mark.parametrize("name", ["satvit", "dino_mm"])
def test_layer_ids_of_channel_stack_encoders(name):
    backbone, _ = _backbone(name, "model.depth=3")
    assert type(backbone).__name__ == "StackViT"
    ids, depth = layer_ids(backbone)
    assert depth == 3
    for i in range(3):
        assert ids[f"blocks.{i}.attn.qkv.weight"] == i + 1
    assert ids["patch_embed.proj.weight"] == 0 and ids["norm.bias"] == 4
    assert {e[0] for e in [[n for n, _ in layer] for layer in encoder_layers(backbone)]} == {"blocks.0", "blocks.1",
                                                                                            "blocks.2"}


def test_param_groups_scale_the_lr_per_layer():
    cfg = load_config(PretrainConfig, None, TINY)
    model = build_classifier(cfg.model, "full", num_classes=19)
    ids, depth = layer_ids(model)
    assert depth == 3 and ids["head.weight"] == ids["backbone.norm.weight"] == 4
    assert ids["backbone.tokenizers.s1.patch_embed.proj.weight"] == 0
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        assert g["lr_scale"] == 0.5 ** (depth + 1 - g["layer_id"])
        for p in g["params"]:
            assert ids[names[id(p)]] == g["layer_id"]
            seen.add(id(p))
        assert g["weight_decay"] == (0.05 if g["name"] == "decay" else 0.0)
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    assert {g["lr_scale"] for g in groups} == {1.0, 0.5, 0.25, 0.125, 0.0625}
    # off: the two groups of pretraining, no scale
    assert [g["name"] for g in param_groups(model, 0.05)] == ["decay", "no_decay"]
    assert all("lr_scale" not in g for g in param_groups(model, 0.05))


@pytest.mark.parametrize("scheduled_wd", [False, True])
def test_train_step_applies_the_lr_scales_on_the_device(scheduled_wd):
    torch.manual_seed(0)
    extra = ["optim.weight_decay_end=0.1"] if scheduled_wd else []
    cfg = load_config(FinetuneConfig, None, TINY + ["mode=full", "optim.warmup_steps=2", "optim.lr=0.01",
                                                    "optim.weight_decay=0.05", *extra])
    model = build_classifier(cfg.model, "full", num_classes=19)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"), layer_decay=0.5)
    objective = TaskObjective(model, get_task("multilabel").loss(None))
    step = TrainStep(objective, optimizer, device=torch.device("cpu"), optim_cfg=cfg.optim, total_steps=4)
    batch = torch.utils.data.default_collate([SyntheticBEN(n=2)[i] for i in range(2)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with forbid_host_sync():
        for _ in range(2):
            step([{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}])
    expected = lr_at(1, cfg.optim, 4)
    for g in optimizer.param_groups:
        assert isinstance(g["lr"], torch.Tensor)
        assert float(g["lr"]) == pytest.approx(expected * g["lr_scale"])
    assert float(step.lr_t) == pytest.approx(expected)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()
               if n.startswith("backbone.blocks.0") and n.endswith("weight"))


def test_scaled_step_equals_torch_adamw_with_per_group_lrs():
    """One step of the fused, device-lr step with lr scales == torch's plain AdamW with float lrs per group."""
    cfg = load_config(FinetuneConfig, None, TINY + ["mode=full", "optim.warmup_steps=0", "optim.lr=0.01",
                                                    "optim.grad_clip=0"])
    torch.manual_seed(0)
    a = build_classifier(cfg.model, "full", num_classes=19)
    b = build_classifier(cfg.model, "full", num_classes=19)
    b.load_state_dict(a.state_dict())
    batch = torch.utils.data.default_collate([SyntheticBEN(n=2)[i] for i in range(2)])
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    loss = get_task("multilabel").loss(None)

    opt_a = build_optimizer(a, cfg.optim, torch.device("cpu"), layer_decay=0.5)
    TrainStep(TaskObjective(a, loss), opt_a, device=torch.device("cpu"), optim_cfg=cfg.optim, total_steps=10)([batch])

    lr0 = lr_at(0, cfg.optim, 10)
    groups = param_groups(b, cfg.optim.weight_decay, layer_decay=0.5)
    for g in groups:
        g["lr"] = lr0 * g["lr_scale"]
    opt_b = torch.optim.AdamW(groups, lr=lr0, betas=tuple(cfg.optim.betas))
    loss(b(batch), batch["label"]).backward()
    opt_b.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


# --- drop path ------------------------------------------------------------------------------------------------


def _batch(n=6, size=32):
    return torch.utils.data.default_collate([SyntheticBEN(n=n, size=size)[i] for i in range(n)])


@pytest.mark.parametrize("name", ["mmfuse", "satvit"])
def test_drop_path_rates_and_forward(name):
    torch.manual_seed(0)
    backbone, _ = _backbone(name, *(["model.encoder_depth=2"] if name == "mmfuse" else ["model.depth=3"]))
    batch = _batch()
    backbone.train()
    plain = next(iter(backbone.encode(batch).values()))
    keys = set(backbone.state_dict())

    set_drop_path(backbone, 0.0)
    torch.manual_seed(1)
    assert torch.equal(next(iter(backbone.encode(batch).values())), plain)  # off: identical, no random draw

    set_drop_path(backbone, 0.6)
    rates = [[blk.drop_path for _, blk in layer] for layer in encoder_layers(backbone)]
    flat = [r[0] for r in rates]
    assert all(len(set(r)) == 1 for r in rates)  # parallel stem blocks of one depth share a rate
    assert flat == pytest.approx(torch.linspace(0, 0.6, len(flat)).tolist())
    assert set(backbone.state_dict()) == keys
    with forbid_host_sync():
        dropped = next(iter(backbone.encode(batch).values()))
    assert not torch.allclose(dropped, plain)
    backbone.eval()
    assert torch.equal(next(iter(backbone.encode(batch).values())), plain)  # eval: stochastic depth off


def test_drop_path_block_scales_kept_samples():
    torch.manual_seed(0)
    blk = Block(8, 2, backend="reference")
    x = torch.randn(64, 4, 8)
    blk.eval()
    ref = blk(x, [4])
    blk.train()
    blk.drop_path = 0.5
    torch.manual_seed(3)
    out = blk(x, [4])
    # per sample either the residual branches ran (scaled) or were dropped: some samples equal the input pathway
    assert out.shape == x.shape and not torch.allclose(out, ref)
    blk.drop_path = 0.0
    assert torch.equal(blk(x, [4]), ref)


# --- a full fine-tune with the recipe ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the label subset")  # 4 samples cannot hold all 19 classes
def test_full_finetune_with_the_recipe_runs_and_logs(tmp_path, monkeypatch):
    seen = {}
    real_build = finetune_module.build_optimizer

    def spy(model, cfg, device=None, layer_decay=1.0):
        seen["layer_decay"] = layer_decay
        seen["drop_path"] = [layer[0][1].drop_path for layer in encoder_layers(model.backbone)]
        opt = real_build(model, cfg, device, layer_decay=layer_decay)
        seen["scales"] = sorted({g["lr_scale"] for g in opt.param_groups})
        return opt

    monkeypatch.setattr(finetune_module, "build_optimizer", spy)
    cfg = load_config(FinetuneConfig, "finetune_full",
                      TINY + ["train.steps=2", "train.batch_size=2", "train.log_every=1", "train.device=cpu",
                              "label_fraction=0.5", "eval_split=", "label_seed=4"])
    data = SyntheticBEN(n=8)
    out = finetune(cfg, tmp_path / "ft", dataset=data, progress=False)
    assert out["step"] == 2
    records = read_metrics(tmp_path / "ft")
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in records)
    assert seen["layer_decay"] == 0.75 and seen["drop_path"] == pytest.approx([0.0, 0.05, 0.1])
    assert seen["scales"] == pytest.approx([0.75 ** i for i in range(4, -1, -1)])
    subset = json.loads((tmp_path / "ft" / "label_subset.json").read_text())
    assert subset["method"] == "iterative_stratification" and subset["label_seed"] == 4
    assert subset["n_selected"] == 4
    saved = (tmp_path / "ft" / "config.yaml").read_text()
    assert "layer_decay: 0.75" in saved and "drop_path: 0.1" in saved
