"""Data parallelism on the CPU: 2 gloo processes follow the single-process trajectory on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmfuse_fast.engine import read_metrics
from mmfuse_fast.engine.distributed import RankSampler
from mmfuse_fast.engine.data import InfiniteSampler

WORKER = Path(__file__).resolve().parent / "_pretrain_worker.py"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(run_dir, overrides, world=1, resume=False, timeout=120):
    spec = json.dumps({"overrides": overrides, "n": 12, "resume": resume})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    port = _free_port()
    for rank in range(world):
        e = dict(env)
        if world > 1:
            e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                     WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(run_dir), spec], env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


def _latest_weights(run_dir):
    ckpt = Path(run_dir) / "checkpoints" / (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same_run(a, b, rtol=1e-5, atol=1e-4):
    la, lb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for k in ("loss", "loss_rec", "loss_con", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=rtol, abs=1e-6), (ra["step"], k)
    wa, wb = _latest_weights(a), _latest_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=k)


def test_rank_sampler_slices_the_global_batch():
    stream = iter(InfiniteSampler(7, seed=5, start=3 * 4))
    expected = [next(stream) for _ in range(4 * 3)]  # global batches of steps 3, 4, 5
    r0, r1 = iter(RankSampler(7, 5, 4, 0, 2, start_step=3)), iter(RankSampler(7, 5, 4, 1, 2, start_step=3))
    got0, got1 = [next(r0) for _ in range(6)], [next(r1) for _ in range(6)]
    for k in range(3):
        assert got0[2 * k:2 * k + 2] + got1[2 * k:2 * k + 2] == expected[4 * k:4 * k + 4]
    with pytest.raises(ValueError, match="multiple"):
        RankSampler(7, 5, 5, 0, 2)


OVERRIDES = ["train.steps=4", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
             "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, the whole global batch, in this process."""
    from conftest import TINY, SyntheticBEN

    from mmfuse_fast.config import PretrainConfig, load_config
    from mmfuse_fast.engine import pretrain

    run_dir = tmp_path_factory.mktemp("single")
    cfg = load_config(PretrainConfig, None, TINY + ["train.device=cpu", *OVERRIDES])
    out = pretrain(cfg, run_dir, dataset=SyntheticBEN(n=12), progress=False)
    assert out["world_size"] == 1
    return run_dir


def test_ddp_two_processes_match_one(tmp_path, single_run):
    double = _run(tmp_path / "two", OVERRIDES, world=2)
    assert double["world_size"] == 2 and double["step"] == 4
    _assert_same_run(single_run, tmp_path / "two")


def test_fsdp2_two_processes_match_one_and_resume(tmp_path, single_run):
    fsdp = OVERRIDES + ["train.distributed=fsdp2"]
    _run(tmp_path / "fsdp", [*fsdp, "train.steps=2"], world=2)  # stops at step 2 (checkpoint) ...
    out = _run(tmp_path / "fsdp", fsdp, world=2, resume=True)  # ... and resumes from its sharded state
    assert out["step"] == 4
    _assert_same_run(single_run, tmp_path / "fsdp")
