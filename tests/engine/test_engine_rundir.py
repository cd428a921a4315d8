"""The run directory cannot be shared or left unusable: one run at a time holds it (a second one, or a requeued
resume, fails at once naming the holder; a killed holder blocks nothing), an interrupted first checkpoint leaves a
run that resumes or restarts, an unloadable newest checkpoint falls back to the one before with a warning, a refused
resume names the keys that changed, the samples the readers skipped are reported, and every such error is one line
with its exit code through the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from mmfuse_fast import cli
from mmfuse_fast.config import PretrainConfig, load_config
from mmfuse_fast.engine import pretrain, read_metrics
from mmfuse_fast.engine.rundir import LOCK_NAME, RunDirLock
from mmfuse_fast.errors import CheckpointError, ConfigError, RunDirError

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_pretrain_worker.py"
RUN = ["train.device=cpu", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
       "data.num_workers=0"]


def _cfg(tiny, *extra):
    return load_config(PretrainConfig, None, [*tiny, *RUN, *extra])


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _wait_until(condition, proc, what, timeout=60):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def _holder_pid(run_dir):
    try:
        return int((Path(run_dir) / LOCK_NAME).read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _weights(run_dir):
    """The newest weights, copied out of the file's memory map (a test truncates the file afterwards)."""
    root = Path(run_dir) / "checkpoints"
    weights = load_file(str(root / (root / "latest").read_text().strip() / "model.safetensors"))
    return {k: v.clone() for k, v in weights.items()}


def _one_line_error(code, expected_code, capsys, *needles):
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.startswith("mmfuse ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_a_second_run_in_a_held_run_directory_fails_at_once_and_a_killed_holder_blocks_nothing(
        tmp_path, tiny_overrides, synthetic):
    run, gate = tmp_path / "run", tmp_path / "gate"
    spec = json.dumps({"overrides": [*RUN, "train.steps=2"], "n": 6, "gate": str(gate)})
    proc = subprocess.Popen([sys.executable, str(WORKER), str(run), spec], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: _holder_pid(run) == proc.pid, proc, "the first run to hold its directory")
        cfg = _cfg(tiny_overrides, "train.steps=2")
        for resume in (False, True):  # a second run, and a requeued --resume of the same run
            t0 = time.perf_counter()
            with pytest.raises(RunDirError) as error:
                pretrain(cfg, run, resume=resume, dataset=synthetic(n=6), progress=False)
            assert time.perf_counter() - t0 < 5  # at once, not after building the model or reading data
            assert str(run) in str(error.value) and f"pid {proc.pid}" in str(error.value)
            assert "\n" not in str(error.value)
    finally:
        proc.send_signal(signal.SIGKILL)  # the holder dies without releasing anything
        proc.communicate(timeout=60)
    assert _holder_pid(run) == proc.pid  # the lock file is still there, naming the dead process
    out = pretrain(_cfg(tiny_overrides, "train.steps=2"), run, resume=True, dataset=synthetic(n=6), progress=False)
    assert out["step"] == 2
    assert (run / LOCK_NAME).read_text() == ""  # released at the end, naming no holder


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_during_its_first_checkpoint_restarts(tmp_path, tiny_overrides, synthetic, resume):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    (checkpoints / ".partial-step_000002-4242").mkdir(parents=True)  # SIGKILL mid-save
    (checkpoints / ".partial-step_000002-4242" / "model.safetensors").write_bytes(b"\0" * 100)
    (checkpoints / "step_000002").mkdir()  # an older version's interrupted save: one file, no `latest`
    (checkpoints / "step_000002" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.warns(UserWarning, match="incomplete checkpoint folder .*step_000002"):
        out = pretrain(_cfg(tiny_overrides, "train.steps=2"), run, resume=resume, dataset=synthetic(n=6),
                       progress=False)
    assert out["step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]
    assert {p.name for p in (checkpoints / "step_000002").iterdir()} == {"model.safetensors", "train_state.pt"}


def test_a_full_disk_at_the_first_checkpoint_leaves_a_run_that_restarts(tmp_path, tiny_overrides, synthetic,
                                                                       monkeypatch):
    from mmfuse_fast.engine import checkpoint as ck

    run, cfg = tmp_path / "run", _cfg(tiny_overrides, "train.steps=2")

    def disk_full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="step_000002 .*No space left on device"):
        pretrain(cfg, run, dataset=synthetic(n=6), progress=False)
    monkeypatch.undo()
    assert list((run / "checkpoints").iterdir()) == []
    # started again as it was, without --resume and without deleting anything
    assert pretrain(cfg, run, dataset=synthetic(n=6), progress=False)["step"] == 2


def test_an_unloadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_overrides, synthetic):
    run, cfg = tmp_path / "run", _cfg(tiny_overrides, "train.steps=4")
    pretrain(cfg, run, dataset=synthetic(n=6), progress=False)
    uninterrupted = _weights(run)
    broken = run / "checkpoints" / "step_000004" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:1000])  # a disk that filled up under an older version
    with pytest.warns(UserWarning, match=f"{broken}.*step_000002"):
        out = pretrain(cfg, run, resume=True, dataset=synthetic(n=6), progress=False)
    assert out["step"] == 4
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    resumed = _weights(run)  # steps 3 and 4 again, from step 2's checkpoint
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=1e-6, msg=k)


def test_no_loadable_checkpoint_and_a_refused_resume_through_the_cli(tmp_path, tiny_overrides, synthetic,
                                                                      monkeypatch, capsys):
    import mmfuse_fast.data

    monkeypatch.setattr(mmfuse_fast.data, "build_dataset", lambda *a, **k: synthetic(n=6))
    sets = [a for s in [*tiny_overrides, *RUN, "train.steps=2"] for a in ("--set", s)]
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--run-dir", str(run), "--no-progress", *sets]) == 0
    capsys.readouterr()

    # a refused resume names the key that changed, with both values: a config error
    code = cli.main(["pretrain", "--run-dir", str(run), "--resume", "--no-progress", *sets, "--set", "optim.lr=0.5"])
    _one_line_error(code, ConfigError.exit_code, capsys, "optim.lr", "0.5", "config differs")

    # a second run while one holds the directory
    with RunDirLock(run):
        code = cli.main(["pretrain", "--run-dir", str(run), "--resume", "--no-progress", *sets])
    _one_line_error(code, RunDirError.exit_code, capsys, str(run), f"pid {os.getpid()}", "in use")

    # no checkpoint loads: one line naming the file
    state = run / "checkpoints" / "step_000002" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    code = cli.main(["pretrain", "--run-dir", str(run), "--resume", "--no-progress", *sets])
    _one_line_error(code, CheckpointError.exit_code, capsys, str(state), "does not load")

    # a run directory that is a file
    (tmp_path / "file").write_text("x")
    code = cli.main(["pretrain", "--run-dir", str(tmp_path / "file"), "--no-progress", *sets])
    _one_line_error(code, RunDirError.exit_code, capsys, str(tmp_path / "file"), "not a directory")


def test_an_experiment_leaves_a_held_sweep_or_run_directory_alone(tmp_path):
    from mmfuse_fast.experiment.plan import Plan, Run
    from mmfuse_fast.experiment.runner import execute

    out = tmp_path / "sweep"
    run = Run("pt-x", "pretrain", {"train": {"steps": 2}})
    plan = Plan(spec="s", scale="tiny", seeds=1, tables=[], overrides=[], runs={run.id: run})
    run_dir = run.run_dir(out)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")  # a run started by hand, before its first checkpoint
    with RunDirLock(run_dir):
        lines = []
        assert execute(plan, out, log=lines.append) == {run.id: "failed (run directory in use)"}
    assert (run_dir / "metrics.jsonl").is_file()  # not "started over" under the running run
    assert str(run_dir) in lines[0] and "in use" in lines[0]
    with RunDirLock(out):  # another sweep executing in the same directory
        with pytest.raises(RunDirError, match="in use"):
            execute(plan, out, log=lines.append)


class BadSamplesDataset(Dataset):
    """A reader with on_error=skip as the data package's readers count: a bad index is replaced by the next good
    one, and `skipped` counts the distinct bad samples met by this process and its DataLoader workers (flags in
    shared memory)."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)
        self.flags = torch.zeros(len(base), dtype=torch.uint8).share_memory_()

    @property
    def skipped(self):
        return int(self.flags.sum())

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        while i in self.bad:
            self.flags[i] = 1
            i = (i + 1) % len(self)
        return self.base[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_samples_are_reported_in_the_metrics_and_the_summary(tmp_path, tiny_overrides, synthetic, workers):
    data = BadSamplesDataset(synthetic(n=6), bad={1, 4})
    out = pretrain(_cfg(tiny_overrides, "train.steps=3", f"data.num_workers={workers}"), tmp_path / "run",
                   dataset=data, progress=False)
    counts = [r["skipped_samples"] for r in read_metrics(tmp_path / "run")]
    assert len(counts) == 3 and counts == sorted(counts)  # a running total on every line
    assert counts[-1] == out["skipped_samples"] == 2  # the 6 samples of the first epoch hold both bad ones
    plain = pretrain(_cfg(tiny_overrides, "train.steps=1"), tmp_path / "plain", dataset=synthetic(n=6),
                     progress=False)
    assert "skipped_samples" not in plain and "skipped_samples" not in read_metrics(tmp_path / "plain")[0]
