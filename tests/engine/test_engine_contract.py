"""The engine serves any model that fulfils the contracts of models/contract.py: a toy model with its own config
class, its own metric names and an EMA teacher updated in the post-optimizer hook trains, resumes and skips bad
steps through the same step and loop as the paper's model; a backbone that has only the public protocol carries
every downstream head; the entry points import components, never each other."""

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mmfuse_fast.config import (MODEL_CONFIGS, BaseModelConfig, ConfigError, FinetuneConfig, OptimConfig,
                                PretrainConfig, load_config, register_model_config)
from mmfuse_fast.engine import finetune, pretrain, read_metrics
from mmfuse_fast.engine.logging import progress_fields
from mmfuse_fast.engine.optim import build_optimizer
from mmfuse_fast.engine.step import TrainStep, forbid_host_sync
from mmfuse_fast.models import MODELS, build_model, register_model
from mmfuse_fast.models.contract import Backbone, PretrainModel

PACKAGE = Path(__file__).resolve().parents[2] / "mmfuse_fast"


@dataclass
class ToyConfig(BaseModelConfig):
    name: str = "toy_ema"
    embed_dim: int = 8
    momentum: float = 0.5


class ToyEMA(nn.Module):
    """A linear student regressing s1 from itself through a bottleneck, and an EMA teacher (a buffer copy of the
    student) pulled towards it after every optimizer step that was not skipped."""

    metric_names = ("loss", "teacher_gap")

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.img_size, self.patch_size = cfg, cfg.img_size, cfg.patch_size
        self.bands = {"s1": tuple(cfg.modalities["s1"])}
        self.modalities = ("s1",)
        c = len(self.bands["s1"])
        self.student = nn.Linear(c, c)
        self.register_buffer("teacher_weight", self.student.weight.detach().clone())
        self.register_buffer("updates", torch.zeros(()))

    @property
    def batch_keys(self):
        return ("s1",)

    def forward(self, batch, generator=None, step=None):
        x = batch["s1"].flatten(2).transpose(1, 2)  # (B, HW, C)
        loss = ((self.student(x) - x) ** 2).mean()
        gap = (self.student.weight - self.teacher_weight).abs().mean().detach()
        return {"objective": loss, "loss": loss, "teacher_gap": gap}

    @torch.no_grad()
    def after_optimizer_step(self, step, skipped):
        m = torch.where(skipped, torch.ones((), device=skipped.device), torch.full((), self.cfg.momentum))
        self.teacher_weight.mul_(m).add_((1 - m) * self.student.weight)
        self.updates.add_((~skipped).float())


@pytest.fixture
def toy_registered():
    register_model_config("toy_ema")(ToyConfig)
    register_model("toy_ema")(ToyEMA)
    yield
    MODEL_CONFIGS.pop("toy_ema")
    MODELS.pop("toy_ema")


def _toy_cfg(*extra):
    return load_config(PretrainConfig, None, ["model.name=toy_ema", "model.img_size=32", "model.patch_size=8",
                                              "train.batch_size=2", "train.log_every=1", "optim.warmup_steps=0",
                                              "optim.lr=0.05", "optim.min_lr=0.05", *extra])


def test_model_section_is_validated_against_the_models_own_config(toy_registered):
    cfg = _toy_cfg("model.momentum=0.9")
    assert type(cfg.model) is ToyConfig and cfg.model.momentum == 0.9
    with pytest.raises(ConfigError, match="model.decoder_dim"):  # a key of the paper's model, not of this one
        _toy_cfg("model.decoder_dim=32")
    with pytest.raises(ConfigError, match="model.momentumm.*did you mean model.momentum"):
        _toy_cfg("model.momentumm=0.9")
    with pytest.raises(ConfigError, match="model.name.*known models"):
        load_config(PretrainConfig, None, ["model.name=no_such_model"])


def test_any_model_trains_resumes_and_updates_its_teacher_in_the_step(toy_registered, tmp_path, synthetic):
    cfg = _toy_cfg("train.steps=4", "train.checkpoint_every=2")
    out = pretrain(cfg, tmp_path / "a", dataset=synthetic(n=6), progress=False)
    rows = read_metrics(tmp_path / "a")
    assert out["step"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "teacher_gap", "grad_norm", "lr"} <= rows[-1].keys() and "loss_rec" not in rows[-1]
    weights = load_file(str(Path(out["checkpoint"]) / "model.safetensors"))
    assert float(weights["updates"]) == 4  # the hook ran once per step, inside it
    assert not torch.equal(weights["teacher_weight"], weights["student.weight"])

    # killed after step 2 (its checkpoint kept), resumed: the same weights, teacher included
    partial = _toy_cfg("train.steps=2", "train.checkpoint_every=2")
    pretrain(partial, tmp_path / "b", dataset=synthetic(n=6), progress=False)
    pretrain(cfg, tmp_path / "b", resume=True, dataset=synthetic(n=6), progress=False)
    resumed = load_file(str(tmp_path / "b" / "checkpoints" / "step_000004" / "model.safetensors"))
    for k, v in weights.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)


def test_hook_sees_the_skip_flag_without_a_host_sync(toy_registered, synthetic):
    cfg = _toy_cfg()
    model = build_model(cfg.model)
    assert isinstance(model, PretrainModel)
    step = TrainStep(model, build_optimizer(model, cfg.optim), device=torch.device("cpu"), optim_cfg=cfg.optim,
                     total_steps=4)
    good = {"s1": torch.randn(2, 2, 32, 32)}
    bad = {"s1": torch.full((2, 2, 32, 32), float("nan"))}
    with forbid_host_sync():
        step([good])
        teacher = model.teacher_weight.clone()
        out = step([bad])
    assert bool(out["skipped"]) and torch.equal(model.teacher_weight, teacher) and float(model.updates) == 1
    snap = step._snapshot()  # the CUDA-graph warmup restore covers buffers too
    model.teacher_weight.add_(1)
    model.updates.add_(5)
    step._restore(snap)
    assert torch.equal(model.teacher_weight, teacher) and float(model.updates) == 1


def test_weight_decay_schedule_runs_on_the_device(tiny_overrides, synthetic):
    from torch.utils.data import default_collate

    def run(*extra):
        cfg = load_config(PretrainConfig, None, tiny_overrides + ["optim.weight_decay=0.3", "optim.lr=0.01",
                                                                  "model.contrastive=false", *extra])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        step = TrainStep(model, build_optimizer(model, cfg.optim), device=torch.device("cpu"),
                         optim_cfg=cfg.optim, total_steps=3, generator=torch.Generator().manual_seed(0))
        ds = synthetic(n=4)
        batch = default_collate([ds[i] for i in range(4)])
        with forbid_host_sync():
            for _ in range(3):
                step([batch])
        return dict(model.named_parameters()), step

    constant, _ = run()
    same, scheduled = run("optim.weight_decay_end=0.3")  # the schedule path with a constant value: same update
    assert scheduled.decayed and all(g["weight_decay"] == 0 for g in scheduled.optimizer.param_groups)
    for k, v in constant.items():
        torch.testing.assert_close(same[k], v, rtol=1e-5, atol=1e-7, msg=k)
    grown, _ = run("optim.weight_decay_end=3.0")  # decays more at the later steps
    name = "blocks.0.mlp.fc1.weight"
    assert grown[name].norm() < same[name].norm()


class ProtocolOnlyBackbone(nn.Module):
    """Nothing but the backbone contract: two modalities, 4x4 patches of 16x16 images."""

    embed_dim, img_size, patch_size, feature_levels, missing_modality = 8, 16, 4, 3, "drop"
    modalities = ("a", "b")
    bands = {"a": ("x",), "b": ("y", "z")}

    def __init__(self):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Conv2d(len(b), 8, 4, 4) for m, b in self.bands.items()})
        self.levels = nn.ModuleList(nn.Linear(8, 8) for _ in range(self.feature_levels))

    def forward_intermediates(self, batch, modalities=None, indices=None):
        out, tokens = [], {m: self.proj[m](batch[m]).flatten(2).transpose(1, 2) for m in modalities or self.modalities}
        for layer in self.levels:
            tokens = {m: layer(t) for m, t in tokens.items()}
            out.append(tokens)
        return [out[i] for i in (indices if indices is not None else range(self.feature_levels))]

    def encode(self, batch, modalities=None):
        return self.forward_intermediates(batch, modalities, [self.feature_levels - 1])[0]


@pytest.mark.parametrize("task", ["multilabel", "scene", "segmentation"])
def test_every_head_runs_on_a_backbone_with_only_the_protocol(task):
    from mmfuse_fast.engine.tasks import TASKS

    backbone = ProtocolOnlyBackbone()
    assert isinstance(backbone, Backbone)
    head = TASKS[task].head(backbone, 5, ["b"] if task == "scene" else None, "concat", 8, False)
    batch = {"a": torch.randn(2, 1, 16, 16), "b": torch.randn(2, 2, 16, 16)}
    out = head(batch)
    assert out.shape == ((2, 5, 16, 16) if task == "segmentation" else (2, 5))


def test_the_paper_model_fulfils_both_contracts(tiny_overrides):
    model = build_model(load_config(PretrainConfig, None, tiny_overrides).model).eval()
    assert isinstance(model, PretrainModel) and isinstance(model, Backbone)
    batch = {m: torch.randn(2, len(b), 32, 32) for m, b in model.bands.items()}
    levels = model.forward_intermediates(batch, ["s2"])
    assert len(levels) == model.feature_levels and list(levels[0]) == ["s2"]
    torch.testing.assert_close(levels[-1]["s2"], model.encode(batch, ["s2"])["s2"])


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_entry_points_import_components_never_each_other():
    entry = {"pretrain", "finetune", "evaluate", "predict"}
    for name in entry:
        imported = {m.rsplit(".", 1)[-1] for m in _imports(PACKAGE / "engine" / f"{name}.py")
                    if m.startswith("mmfuse_fast.engine.")}
        allowed = {"evaluate"} if name == "finetune" else set()  # fine-tuning ends with an evaluation
        assert imported & entry <= allowed, (name, imported & entry)


def test_finetune_refuses_model_keys_the_pretrained_run_fixes(tiny_overrides, tmp_path, synthetic):
    pt = tmp_path / "pt"
    pretrain(load_config(PretrainConfig, None, tiny_overrides + ["train.steps=1", "train.batch_size=2"]), pt,
             dataset=synthetic(n=2), progress=False)
    for key in ("model.embed_dim=48", "model.mask_ratio=0.5"):
        cfg = load_config(FinetuneConfig, None, [f"pretrained={pt}", key, "train.steps=1"])
        with pytest.raises(ConfigError, match=key.split("=")[0] + ".*cannot apply"):
            finetune(cfg, tmp_path / "ft", dataset=synthetic(n=2), progress=False)
    assert not (tmp_path / "ft" / "checkpoints").exists()
    # how the backbone runs may change; the run records the backbone it trained
    cfg = load_config(FinetuneConfig, None, [f"pretrained={pt}", "model.ops_backend=reference", "train.steps=1",
                                             "train.batch_size=2", "eval_split=test"])
    out = finetune(cfg, tmp_path / "ft", dataset=synthetic(n=2), eval_dataset=synthetic(n=2), progress=False)
    saved = load_config(FinetuneConfig, tmp_path / "ft" / "config.yaml")
    assert saved.model.embed_dim == 16 and saved.model.ops_backend == "reference"
    assert out["eval"]["split"] == "test" and out["eval"]["dataset"] == "SyntheticBEN"


def test_an_image_size_that_does_not_match_the_data_is_one_clear_error(tiny_overrides, tmp_path, synthetic):
    cfg = load_config(PretrainConfig, None, tiny_overrides + ["model.img_size=64", "train.steps=1"])
    with pytest.raises(ConfigError, match="model.img_size.*64.*32x32"):
        pretrain(cfg, tmp_path / "run", dataset=synthetic(n=2), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_device_without_cuda_is_a_config_error(tiny_overrides, tmp_path, synthetic):
    cfg = load_config(PretrainConfig, None, tiny_overrides + ["train.device=cuda", "train.steps=1"])
    with pytest.raises(ConfigError, match="train.device.*CUDA is not available"):
        pretrain(cfg, tmp_path / "run", dataset=synthetic(n=2), progress=False)


def test_progress_bar_shows_throughput_mfu_and_memory():
    shown = progress_fields({"loss": 1.23456, "lr": 1e-4, "samples_per_s": 41.27, "mfu": 0.0123,
                             "peak_mem_mib": 812.4, "grad_norm": 3.0, "tflops": None})
    assert shown == {"loss": "1.235", "lr": "0.0001", "samples/s": "41.3", "MFU": "1.2%", "mem": "812MiB"}
    assert progress_fields({"loss": 2.0, "mfu": None}) == {"loss": "2"}


def test_optim_config_knows_the_schedule_and_clip_keys():
    names = {f.name for f in dataclasses.fields(OptimConfig)}
    assert {"weight_decay_end", "grad_clip_mode"} <= names


def test_an_ops_backend_that_cannot_run_here_is_one_line(tmp_path, monkeypatch, capsys):
    from mmfuse_fast.cli import main
    from mmfuse_fast.ops import _backend

    monkeypatch.setattr(_backend, "_TRITON_INSTALLED", False)
    code = main(["pretrain", "--run-dir", str(tmp_path / "run"), "--no-progress", "--set",
                 "model.ops_backend=triton", "--set", "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "model.ops_backend" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_finetuning_resumes_through_the_same_loop(tiny_overrides, tmp_path, synthetic):
    pt = tmp_path / "pt"
    pretrain(load_config(PretrainConfig, None, tiny_overrides + ["train.steps=1", "train.batch_size=2"]), pt,
             dataset=synthetic(n=2), progress=False)

    def cfg(steps):
        return load_config(FinetuneConfig, None, [f"pretrained={pt}", "mode=full", f"train.steps={steps}",
                                                  "train.checkpoint_every=2", "train.batch_size=3", "eval_split=",
                                                  "train.log_every=1"])

    straight = finetune(cfg(4), tmp_path / "a", dataset=synthetic(n=5), progress=False)
    finetune(cfg(2), tmp_path / "b", dataset=synthetic(n=5), progress=False)
    resumed = finetune(cfg(4), tmp_path / "b", resume=True, dataset=synthetic(n=5), progress=False)
    a = load_file(str(Path(straight["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["checkpoint"]) / "model.safetensors"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]
