import json

import pytest
import torch
from safetensors.torch import load_file

from mmfuse_fast.config import FinetuneConfig, PretrainConfig, load_config
from mmfuse_fast.engine import NonFiniteLossError, RunDirError, evaluate, finetune, pretrain, read_metrics
import importlib

loop_module = importlib.import_module("mmfuse_fast.engine.loop")
from mmfuse_fast.engine.data import InfiniteSampler, epoch_order
from mmfuse_fast.engine.optim import param_groups
from mmfuse_fast.engine.schedule import lr_at


def _cfg(tiny, *extra):
    return load_config(PretrainConfig, None, tiny + ["train.batch_size=3", "train.log_every=2", *extra])


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                         / "model.safetensors"))


def test_sampler_is_reproducible_and_resumable():
    full = InfiniteSampler(5, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(17)]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert stream[:5] == list(epoch_order(5, 3, 0)) and stream[5:10] == list(epoch_order(5, 3, 1))
    it = iter(InfiniteSampler(5, seed=3, start=7))
    assert [next(it) for _ in range(10)] == stream[7:]


def test_lr_schedule_and_no_decay_groups(tiny_overrides):
    cfg = _cfg(tiny_overrides, "optim.warmup_steps=4", "optim.lr=1.0", "optim.min_lr=0.1")
    lrs = [lr_at(s, cfg.optim, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] > 0.1 and lrs[-1] == pytest.approx(0.1, abs=0.02)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    from mmfuse_fast.models import build_model
    model = build_model(cfg.model)
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert any("mask_token" in n for n in no_decay) and any("modality_embed" in n for n in no_decay)
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])


def test_resume_matches_uninterrupted_run(tmp_path, tiny_overrides, synthetic, monkeypatch):
    cfg = _cfg(tiny_overrides, "train.steps=6", "train.checkpoint_every=3")
    data = synthetic(n=5)  # 5 samples, batch 3: batches straddle epochs
    pretrain(cfg, tmp_path / "a", dataset=data, progress=False)

    real_save = loop_module.save_checkpoint

    def crash_after_first(run_dir, step, *a, **k):
        out = real_save(run_dir, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt("simulated preemption")
        return out

    monkeypatch.setattr(loop_module, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "b", dataset=data, progress=False)
    monkeypatch.undo()

    with pytest.raises(RunDirError, match="resume"):  # never overwrite a run silently
        pretrain(cfg, tmp_path / "b", dataset=data, progress=False)
    out = pretrain(cfg, tmp_path / "b", resume=True, dataset=data, progress=False)
    assert out["step"] == 6

    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la, lb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [2, 4, 6]
    for ra, rb in zip(la, lb):
        if ra["step"] != 4:  # the resumed run's line at step 4 averages step 4 only (its checkpoint was at 3)
            assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]
    assert (tmp_path / "b" / "config.yaml").is_file()

    # a changed config is refused on resume
    changed = _cfg(tiny_overrides, "train.steps=8", "train.checkpoint_every=3", "optim.lr=0.5")
    with pytest.raises(Exception, match="config differs"):
        pretrain(changed, tmp_path / "b", resume=True, dataset=data, progress=False)


def test_compiled_pretraining_follows_the_eager_run(tmp_path, tiny_overrides, synthetic, monkeypatch):
    """train.compile: the model traced by torch.compile trains like the eager one, checkpoint keys unchanged.
    The aot_eager backend keeps the traced graph and its autograd but skips inductor's C++ build (~100 s here)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        cfg = _cfg(tiny_overrides, "model.ops_backend=auto", "train.steps=4", "train.log_every=1",
                   f"train.compile={str(compiled).lower()}")
        pretrain(cfg, tmp_path / str(compiled), dataset=synthetic(n=8), progress=False)
        runs[compiled] = [r["loss"] for r in read_metrics(tmp_path / str(compiled))]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    assert _weights(tmp_path / "True").keys() == _weights(tmp_path / "False").keys()


def test_non_finite_loss_names_the_step(tmp_path, tiny_overrides, synthetic):
    cfg = _cfg(tiny_overrides, "train.steps=4", "train.batch_size=1", "train.log_every=4",
               "train.checkpoint_every=4", "data.splits=[train]", "train.max_bad_steps=1")
    data = synthetic(n=4, nan_at=0)
    # sample order is epoch_order(4, seed 0, epoch 0); the NaN sample comes at this step
    bad_step = list(epoch_order(4, 0, 0)).index(0) + 1
    with pytest.raises(NonFiniteLossError, match=f"at step {bad_step}"):
        pretrain(cfg, tmp_path / "nan", dataset=data, progress=False)
    assert not (tmp_path / "nan" / "checkpoints" / "latest").exists()


def test_finetune_label_subset_and_evaluate(tmp_path, tiny_overrides, synthetic):
    data = synthetic(n=8)
    pretrain(_cfg(tiny_overrides, "train.steps=2"), tmp_path / "pt", dataset=data, progress=False)
    for mode in ("linear", "full"):
        cfg = load_config(FinetuneConfig, None, [f"pretrained={tmp_path / 'pt'}", f"mode={mode}",
                                                 "label_fraction=0.3", "train.steps=3", "train.batch_size=2"])
        out = finetune(cfg, tmp_path / mode, dataset=data, eval_dataset=synthetic(n=5), progress=False)
        subset = json.loads((tmp_path / mode / "label_subset.json").read_text())
        assert subset["n_selected"] == len(subset["indices"]) == len(subset["ids"]) == 2  # round(0.3 * 8)
        assert subset["ids"] == [data.ids[i] for i in subset["indices"]]
        assert out["eval"]["n_samples"] == 5
        saved = json.loads((tmp_path / mode / "metrics_test.json").read_text())
        assert {"map_micro", "map_macro", "f1_samples", "n_samples"} <= saved.keys()
    # same seed, same subset; evaluate rebuilds the classifier from the run dir alone
    assert json.loads((tmp_path / "linear" / "label_subset.json").read_text())["indices"] == subset["indices"]
    again = evaluate(tmp_path / "full", split="validation", dataset=synthetic(n=5), progress=False)
    assert again["map_micro"] == pytest.approx(out["eval"]["map_micro"])
    assert (tmp_path / "full" / "metrics_validation.json").is_file()

    # at least one sample, even for a tiny fraction
    cfg = load_config(FinetuneConfig, None, [f"pretrained={tmp_path / 'pt'}", "label_fraction=0.01",
                                             "train.steps=1", "eval_split="])
    finetune(cfg, tmp_path / "one", dataset=data, progress=False)
    assert json.loads((tmp_path / "one" / "label_subset.json").read_text())["n_selected"] == 1


def test_plots(tmp_path, tiny_overrides, synthetic):
    from mmfuse_fast.engine.checkpoint import load_weights
    from mmfuse_fast.engine.plots import plot_loss_curves, plot_reconstructions, true_colour
    from mmfuse_fast.models import build_model

    cfg = _cfg(tiny_overrides, "train.steps=4")
    pretrain(cfg, tmp_path / "pt", dataset=synthetic(n=4), progress=False)
    png = plot_loss_curves(tmp_path / "pt", tmp_path / "loss.png")
    assert png.stat().st_size > 1000
    model = load_weights(build_model(cfg.model), tmp_path / "pt")
    batch = torch.utils.data.default_collate([synthetic(n=3)[i] for i in range(3)])
    png = plot_reconstructions(model, batch, tmp_path / "rec.png", n=2)
    assert png.stat().st_size > 1000
    # bands by name: B04, B03, B02 -> channels 3, 2, 1 of the default S2 order
    img = torch.arange(12.0)[:, None, None].expand(12, 2, 2)
    assert true_colour(img, cfg.model.modalities["s2"])[0, 0].tolist() == [3.0, 2.0, 1.0]
    assert true_colour(img, list(reversed(cfg.model.modalities["s2"])))[0, 0].tolist() == [8.0, 9.0, 10.0]
