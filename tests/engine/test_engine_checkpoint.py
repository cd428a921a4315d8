import os
import warnings

import pytest
import torch
import torch.nn as nn

from mmfuse_fast.engine import checkpoint as ck


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def _trained(seed=0):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
    return model, opt


def _state(opt, step):
    return {"optimizer": opt.state_dict(), "config_hash": "abc", "rng": ck.rng_state({"g": torch.Generator()})}


def _same_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def test_round_trip_bit_identical(tmp_path):
    model, opt = _trained()
    path = ck.save_checkpoint(tmp_path, 3, model, _state(opt, 3))
    assert ck.latest_checkpoint(tmp_path) == path
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "train_state.pt"}

    model2, opt2 = _model(seed=1), None
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    state = ck.load_checkpoint(tmp_path, model2)  # weights_only=True inside
    opt2.load_state_dict(state["optimizer"])
    assert state["step"] == 3
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert _same_tree(opt.state_dict(), opt2.state_dict())
    # the file really loads with weights_only=True
    torch.load(path / "train_state.pt", weights_only=True)


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(7)
    state = ck.rng_state({"g": g})
    a = (torch.rand(3), torch.rand(3, generator=g))
    import random
    import numpy as np
    extra = (random.random(), np.random.rand())
    ck.set_rng_state(state, {"g": g})
    b = (torch.rand(3), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (random.random(), np.random.rand()) == extra


def test_interrupted_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    old = ck.save_checkpoint(tmp_path, 1, model, _state(opt, 1))
    old_bytes = {p.name: p.read_bytes() for p in old.iterdir()}

    # the next save dies half-way through writing the training state
    def failing_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(ck.CheckpointError, match=r"step_000002 \(disk full\)"):
        ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2))
    monkeypatch.undo()

    assert ck.latest_checkpoint(tmp_path) == old
    assert {p.name: p.read_bytes() for p in old.iterdir()} == old_bytes
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    restored = _model(seed=2)
    assert ck.load_checkpoint(tmp_path, restored)["step"] == 1


def test_atomic_write_failure_keeps_file(tmp_path):
    target = tmp_path / "f.txt"
    ck.atomic_write_text(target, "old")

    def bad(tmp):
        with open(tmp, "w") as f:
            f.write("new but incomplete")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ck.atomic_write(target, bad)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_keep_prunes_old_checkpoints(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, model, _state(opt, step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000003"]


def test_load_weights_lists_missing_and_unexpected(tmp_path):
    model = _model()
    ck.save_weights(model, tmp_path / "w.safetensors")
    other = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7))  # lacks 2.*
    other.add_module("extra", nn.Linear(7, 2))  # has extra.*
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights(other, tmp_path / "w.safetensors")
    msg = str(e.value)
    assert "2 missing key(s) [extra.bias, extra.weight]" in msg
    assert "2 unexpected key(s) [2.bias, 2.weight]" in msg
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_weights(model, tmp_path / "nope.safetensors")


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    ck.save_weights(model, tmp_path / "w.safetensors")
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ck.load_weights(fresh, tmp_path / "w.safetensors")
    assert torch.equal(fresh[1].weight, model[0].weight)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_interrupted_first_checkpoint_leaves_no_step_folder(tmp_path, monkeypatch):
    model, opt = _trained()

    def killed(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2))
    monkeypatch.undo()
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert ck.latest_checkpoint(tmp_path) is None and ck.read_newest_checkpoint(tmp_path) is None
    assert ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2)) == ck.latest_checkpoint(tmp_path)


def test_partial_and_incomplete_folders_are_never_read(tmp_path):
    model, opt = _trained()
    good = ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2))
    root = tmp_path / "checkpoints"
    killed_mid_save = root / ".partial-step_000004-4242"  # what SIGKILL during a save leaves
    killed_mid_save.mkdir()
    (killed_mid_save / "model.safetensors").write_bytes(b"partial")
    older_layout = root / "step_000003"  # a step folder with one file: an older version's interrupted save
    older_layout.mkdir()
    (older_layout / "model.safetensors").write_bytes(b"partial")
    assert ck.latest_checkpoint(tmp_path) == good
    assert ck.complete_checkpoints(tmp_path) == [good] and ck.incomplete_checkpoints(tmp_path) == [older_layout]
    assert ck.read_newest_checkpoint(tmp_path).path == good
    ck.discard_partial_checkpoints(tmp_path)
    assert not killed_mid_save.exists() and good.is_dir()


def test_a_step_written_again_replaces_its_folder(tmp_path):
    model, opt = _trained()
    ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    path = ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "step_000002"]
    restored = _model(seed=3)
    ck.load_checkpoint(tmp_path, restored)
    assert torch.equal(restored[0].weight, model[0].weight)


@pytest.mark.parametrize("broken", ["model.safetensors", "train_state.pt"])
def test_unloadable_newest_checkpoint_falls_back_with_a_warning_naming_it(tmp_path, broken):
    model, opt = _trained()
    older = ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2))
    newest = ck.save_checkpoint(tmp_path, 4, model, _state(opt, 4))
    _truncate(newest / broken)
    with pytest.warns(UserWarning, match=str(newest / broken)) as record:
        loaded = ck.read_newest_checkpoint(tmp_path)
    assert loaded.path == older and loaded.state["step"] == 2
    assert "step_000002" in str(record[0].message)


def test_no_loadable_checkpoint_is_one_error_naming_every_file(tmp_path):
    model, opt = _trained()
    older = ck.save_checkpoint(tmp_path, 2, model, _state(opt, 2))
    newest = ck.save_checkpoint(tmp_path, 4, model, _state(opt, 4))
    _truncate(newest / "train_state.pt")
    (older / "model.safetensors").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped silently or with a warning: one error
        with pytest.raises(ck.CheckpointError) as error:
            ck.read_newest_checkpoint(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert str(newest / "train_state.pt") in message and str(older / "model.safetensors") in message
    with pytest.raises(ck.CheckpointError, match="model.safetensors does not load"):
        ck.load_weights(_model(), older)


def test_config_differences_name_the_keys():
    old = {"optim": {"lr": 0.001, "betas": [0.9, 0.95]}, "model": {"embed_dim": 16}}
    new = {"optim": {"lr": 0.5, "betas": (0.9, 0.95)}, "model": {"embed_dim": 16, "sensor_drop": 0.1}}
    assert ck.config_differences(old, new) == ["model.sensor_drop: 'unset' -> 0.1", "optim.lr: 0.001 -> 0.5"]
    assert ck.config_differences(old, old) == []
