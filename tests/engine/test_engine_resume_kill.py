"""Safe interruption: a run killed with SIGKILL (no chance to clean up), resumed, then stopped with SIGTERM
(checkpoint at the current step, exit 143), resumed again, ends with the loss and weights of an uninterrupted run;
no step folder is ever half-written."""

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

from mmfuse_fast.engine import read_metrics

WORKER = Path(__file__).resolve().parent / "_pretrain_worker.py"
ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["train.steps=10", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
             "optim.warmup_steps=3", "data.num_workers=0"]


def _start(run_dir, resume=False, sleep=0.0):
    spec = json.dumps({"overrides": OVERRIDES, "n": 7, "resume": resume, "sleep": sleep})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), spec], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _latest_step(run_dir) -> int:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _wait_for(proc, run_dir, step, timeout=60):
    t0 = time.time()
    while _latest_step(run_dir) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "the run made no progress"
        time.sleep(0.02)


def _assert_checkpoints_whole(run_dir):
    """Every step folder holds both files and they load completely (a save cut short leaves only a hidden partial
    folder); `latest` names one of them."""
    root = Path(run_dir) / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    assert (latest / "model.safetensors").is_file() and (latest / "train_state.pt").is_file()
    for d in root.glob("step_*"):
        assert load_file(str(d / "model.safetensors"))
        assert torch.load(d / "train_state.pt", weights_only=True)["step"] == int(d.name.split("_")[1])


def _weights(run_dir):
    root = Path(run_dir) / "checkpoints"
    return load_file(str(root / (root / "latest").read_text().strip() / "model.safetensors"))


def test_sigkill_then_sigterm_then_resume_equals_uninterrupted(tmp_path):
    ref = _start(tmp_path / "ref")
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err[-3000:]

    run = tmp_path / "run"
    proc = _start(run, sleep=0.03)
    _wait_for(proc, run, 4)
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step or mid-checkpoint
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _assert_checkpoints_whole(run)
    killed_at = _latest_step(run)
    assert 4 <= killed_at < 10

    proc = _start(run, resume=True, sleep=0.03)
    _wait_for(proc, run, killed_at + 1)  # the resumed run wrote a checkpoint of its own
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    _assert_checkpoints_whole(run)
    if proc.returncode == 0:  # it finished before the signal landed: nothing left to resume
        assert _latest_step(run) == 10
    else:
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["interrupted"] == "SIGTERM" and summary["step"] == _latest_step(run) < 10
        proc = _start(run, resume=True)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]

    la, lb = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in lb] == list(range(1, 11)) == [r["step"] for r in la]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), ra["step"]
    wa, wb = _weights(tmp_path / "ref"), _weights(run)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
