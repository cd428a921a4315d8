"""Every registered pretraining model through the whole engine (the paper's model and the baselines: Fus-MAE,
SatViT, DINO-MM): a host-sync-free training step, one graph after the random draws, SIGKILL + resume to the same
weights, 2-process gloo DDP == 1 process, and the CLI pipeline pretrain -> finetune (S1, S2, S1+S2) -> evaluate on
the real BigEarthNet v2 sample.

Cost: the models are tiny (conftest.TINY_MODELS: 32x32 images, widths of 16); the runs of a model share one
uninterrupted reference run (module scope, made in this process on one thread while a worker process starts),
and each model is pretrained once for the CLI tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import SyntheticBEN, tiny_model_overrides

from mmfuse_fast.cli import main
from mmfuse_fast.config import PretrainConfig, load_config
from mmfuse_fast.engine import read_metrics
from mmfuse_fast.engine.optim import build_optimizer
from mmfuse_fast.engine.step import HostSyncError, TrainStep, forbid_host_sync
from mmfuse_fast.models import MODELS, build_model

WORKER = Path(__file__).resolve().parent / "_pretrain_worker.py"
ROOT = Path(__file__).resolve().parents[2]
MODEL_NAMES = ("mmfuse", "satvit", "fus_mae", "dino_mm")
# built-in CPU-sized config of each model (the CLI tests start from it)
TINY_CONFIG = {"mmfuse": "tiny", "satvit": "satvit_tiny", "fus_mae": "fus_mae_tiny", "dino_mm": "dino_mm_tiny"}

# The runs of the reference, DDP and SIGKILL + resume tests: one shape for all, 6 steps of a global batch of 4,
# a checkpoint every 2 steps. Every draw is made for the global batch (models/draws.py), so 2 ranks == 1 process.
STEPS = 6
OVERRIDES = [f"train.steps={STEPS}", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
             "optim.warmup_steps=2", "data.num_workers=0"]
N_SAMPLES = 12


def _require(name: str) -> None:
    if name not in MODELS:  # only while DINO-MM is being written (it registers itself in models/__init__.py)
        pytest.skip(f"model {name!r} is not registered yet (mmfuse_fast.models.MODELS: {sorted(MODELS)})")


@pytest.fixture(params=MODEL_NAMES)
def name(request) -> str:
    _require(request.param)
    return request.param


# ------------------------------------------------------------------------------------------ helpers: processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir, model: str, world: int = 1, resume: bool = False, sleep: float = 0.0,
            gate: Path | None = None) -> list[subprocess.Popen]:
    """The worker (_pretrain_worker.py) on `model`'s tiny config, as `world` gloo ranks (one thread each); with
    `gate`, its data reads wait until that file exists."""
    spec = json.dumps({"model": model, "overrides": OVERRIDES, "n": N_SAMPLES, "resume": resume, "sleep": sleep,
                       "gate": str(gate) if gate else None})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    port = _free_port()
    procs = []
    for rank in range(world):
        e = dict(env)
        if world > 1:
            e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                     WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(run_dir), spec], env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _reap(procs: list[subprocess.Popen]) -> None:
    """Kills what is still running of `procs` (a failed test leaves no worker behind)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> dict:
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        _reap(procs)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


def _pretrain_here(run_dir, model: str, resume: bool = False) -> dict:
    """The worker's run in this process, on one thread as the workers are: the same arithmetic, bit for bit."""
    from mmfuse_fast.engine import pretrain

    cfg = load_config(PretrainConfig, None, tiny_model_overrides(model) + ["train.device=cpu", *OVERRIDES])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(cfg, run_dir, resume=resume, dataset=SyntheticBEN(n=N_SAMPLES), progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One uninterrupted single-process run per model (made in this process on first use), shared by the DDP,
    SIGKILL and bad-input tests."""
    root, runs = tmp_path_factory.mktemp("reference"), {}

    def get(model: str) -> Path:
        if model not in runs:
            summary = _pretrain_here(root / model, model)
            assert summary["step"] == STEPS and summary["world_size"] == 1
            runs[model] = root / model
        return runs[model]

    return get


# ------------------------------------------------------------------------------------------ helpers: checkpoints


def _latest_step(run_dir) -> int:
    try:
        return int((Path(run_dir) / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _latest(run_dir) -> Path:
    root = Path(run_dir) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def _flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state (dicts, lists), by dotted path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(_flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _saved_tensors(run_dir) -> dict[str, torch.Tensor]:
    """All tensors of the latest checkpoint: weights (model.safetensors: teacher included for DINO-MM) and the
    training state (optimizer moments and steps, the engine's device counters, generator states)."""
    ckpt = _latest(run_dir)
    out = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    out.update({f"state.{k}": v for k, v in
                _flat_tensors(torch.load(ckpt / "train_state.pt", weights_only=True)).items()})
    return out


def _metric_keys(model: str) -> tuple[str, ...]:
    return (*MODELS[model].metric_names, "grad_norm")


def _assert_same_metrics(a, b, keys, rel: float, abs_: float = 1e-6) -> None:
    la, lb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    for ra, rb in zip(la, lb):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=abs_), (ra["step"], k)


# ------------------------------------------------------------------------------------------ 1. graph safety


def _tiny_cfg(model: str, *extra: str):
    return load_config(PretrainConfig, None, tiny_model_overrides(model) + ["train.device=cpu", *extra])


def _batch(model: torch.nn.Module, n: int = 4, start: int = 0) -> dict:
    ds = SyntheticBEN(n=start + n)
    batch = default_collate([ds[i] for i in range(start, start + n)])
    return {k: v for k, v in batch.items() if k in model.batch_keys}


def test_train_step_has_no_host_sync(name):
    """Forward, backward, clipping, AdamW, metric sums and (DINO-MM) the EMA teacher hook: no host sync, so the
    step can be one CUDA graph. The same check catches a sync put into this model's forward."""
    cfg = _tiny_cfg(name, "optim.warmup_steps=2")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    step = TrainStep(model, opt, device=torch.device("cpu"), optim_cfg=cfg.optim, total_steps=6, model=model,
                     generator=torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with forbid_host_sync():
        step([_batch(model)])
        step([_batch(model, start=4)])
    metrics = step.read_metrics()
    assert metrics["skipped_steps"] == 0
    for k in MODELS[name].metric_names:
        assert metrics[k] == metrics[k], k  # finite (not NaN)
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved, "two optimizer steps changed nothing"

    forward = model.forward

    def with_item(*a, **k):
        out = forward(*a, **k)
        out["objective"].item()
        return out

    model.forward = with_item
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), forbid_host_sync():
        step([_batch(model)])


# ------------------------------------------------------------------------------------------ 2. compile


def _is_draw_break(reason) -> bool:
    text = str(reason.reason)
    return "torch.compiler.disable" in text and "draw_noise" in text


def test_forward_has_one_graph_after_the_draws(name):
    """`--compile`: dynamo traces the model's forward (with an explicit generator) with no graph break except the
    one `draw_noise` (torch.compiler.disable: the draws from a torch.Generator run eagerly). Where the draws come
    first (mmfuse, fus_mae) there is no break at all: one graph; where something runs before them (SatViT stacks and
    embeds the bands first) there is exactly that one break. Then, with the draws fixed (draw_noise replaced by
    its result), `torch.compile(model, fullgraph=True)` captures the rest as a single graph (backend "eager":
    this checks graph capture, not inductor code generation) and reproduces the eager outputs."""
    cfg = _tiny_cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = _batch(model)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(batch, generator=torch.Generator().manual_seed(0))
        reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
        assert all(_is_draw_break(r) for r in explained.break_reasons), reasons
        assert explained.graph_break_count <= 1, reasons
        assert explained.graph_count == explained.graph_break_count + 1

        noise = model.draw_noise(4, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
        eager = model(batch, generator=torch.Generator().manual_seed(0))
        model.draw_noise = lambda *a, **k: noise  # the same draws, now traceable
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        out = compiled(batch, generator=None)
        for k in ("objective", *MODELS[name].metric_names):
            torch.testing.assert_close(out[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ 3. SIGKILL + resume


def _wait_for(proc, run_dir, step: int, timeout: float = 90) -> None:
    t0 = time.time()
    while _latest_step(run_dir) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "the run made no progress"
        time.sleep(0.01)


def test_sigkill_then_resume_equals_uninterrupted(name, references, tmp_path):
    run, gate = tmp_path / "run", tmp_path / "go"
    (proc,) = _launch(run, name, sleep=0.05, gate=gate)  # slow data: at least 0.2 s a step, once released
    try:
        ref = references(name)  # made here while the other process starts (and waits at its first data read)
        gate.touch()
        _wait_for(proc, run, 2)
        proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step or mid-checkpoint
        proc.wait(timeout=30)
    finally:
        _reap([proc])
    assert proc.returncode == -signal.SIGKILL
    killed_at = _latest_step(run)
    assert 2 <= killed_at < STEPS

    out = _pretrain_here(run, name, resume=True)
    assert out["step"] == STEPS
    _assert_same_metrics(ref, run, _metric_keys(name), rel=1e-6)
    wa, wb = _saved_tensors(ref), _saved_tensors(run)
    assert wa.keys() == wb.keys()
    if name == "dino_mm":
        assert any("teacher" in k for k in wa), "DINO-MM's checkpoint holds no teacher weights"
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(wb[k], wa[k]), k


# ------------------------------------------------------------------------------------------ 4. DDP == 1 process


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The 2-process runs of every registered model, all started at once on first use (their start-up, mostly
    imports, is most of their cost and overlaps); each test waits for its own."""
    root = tmp_path_factory.mktemp("ddp")
    procs = {m: _launch(root / m, m, world=2) for m in MODEL_NAMES if m in MODELS}
    yield root, procs
    for p in procs.values():
        _reap(p)


def test_ddp_two_processes_match_one(name, references, ddp_runs):
    root, procs = ddp_runs
    try:
        ref = references(name)  # made here while the worker processes start
    finally:
        out = _finish(procs[name])
    assert out["world_size"] == 2 and out["step"] == STEPS
    two = root / name
    _assert_same_metrics(ref, two, _metric_keys(name), rel=1e-5)
    wa, wb = (load_file(str(_latest(r) / "model.safetensors")) for r in (ref, two))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-4, msg=k)


# ------------------------------------------------------------------------------------------ 5. CLI, real sample


def _sets(items) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _overrides_120(model: str) -> list[str]:
    """The tiny widths at the sample's 120 px: 20 px patches (36 tokens), the rest as conftest.TINY_MODELS."""
    keep = [o for o in tiny_model_overrides(model) if o.split("=")[0] not in
            ("model.name", "model.img_size", "model.patch_size", "model.local_crop_size")]
    extra = ["model.local_crop_size=40"] if model == "dino_mm" else []
    return [*keep, *extra, "model.patch_size=20"]


@pytest.fixture(scope="module")
def pretrained_runs(ben_v2_root, tmp_path_factory):
    """One CLI pretraining run per model on the real sample (2 steps of 4), made on first use."""
    root, runs = tmp_path_factory.mktemp("cli_pretrain"), {}

    def get(model: str) -> Path:
        if model not in runs:
            run = root / model
            code = main(["pretrain", "--config", TINY_CONFIG[model], "--run-dir", str(run), "--no-progress",
                         *_sets(_overrides_120(model) + [f"data.root={ben_v2_root}", "train.steps=2",
                                                         "train.batch_size=4", "train.log_every=1"])])
            assert code == 0
            saved = load_config(PretrainConfig, run / "config.yaml")
            assert saved.model.name == model and saved.model.img_size == 120
            assert read_metrics(run)[-1]["step"] == 2
            runs[model] = run
        return runs[model]

    return get


SUBSETS = (["s1"], ["s2"], ["s1", "s2"])


@pytest.mark.parametrize("modalities", SUBSETS, ids=lambda m: "+".join(m))
def test_cli_pretrain_finetune_evaluate_on_modalities(name, modalities, pretrained_runs, ben_v2_root, tmp_path,
                                                      capsys):
    from mmfuse_fast.config import FinetuneConfig
    from mmfuse_fast.engine.tasks import load_classifier
    from mmfuse_fast.models.contract import STACK

    pt, ft = pretrained_runs(name), tmp_path / "ft"
    mods = "[" + ", ".join(modalities) + "]"
    assert main(["finetune", "--pretrained", str(pt), "--run-dir", str(ft), "--no-progress",
                 *_sets([f"modalities={mods}", f"data.root={ben_v2_root}", "train.steps=2", "train.batch_size=4",
                         "eval_split="])]) == 0  # linear probe (the default mode)
    cfg = load_config(FinetuneConfig, ft / "config.yaml")
    assert cfg.modalities == modalities and cfg.mode == "linear" and cfg.model.name == name
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(ft), "--split", "test", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((ft / "metrics_test.json").read_text())
    assert saved["modalities"] == printed["modalities"] == modalities
    assert saved["n_samples"] == 8
    for k in ("map_micro", "map_macro"):
        assert 0 <= saved[k] <= 1, (k, saved[k])

    # the evaluated classifier is rebuilt on the same modalities
    model, _, _ = load_classifier(ft)
    assert model.modalities == tuple(modalities)
    assert model.backbone.missing_modality == ("zero" if name in ("satvit", "dino_mm") else "drop")
    with torch.no_grad():
        x = {m: torch.zeros(1, len(b), 120, 120) for m, b in model.backbone.bands.items() if m in modalities}
        tokens = model.backbone.encode(x, model.modalities)
    assert set(tokens) == ({STACK} if model.backbone.missing_modality == "zero" else set(modalities))


# ------------------------------------------------------------------------------------------ 6. bad input


def assert_one_line_error(code, expected_code, capsys, *fragments):
    captured = capsys.readouterr()
    assert code == expected_code, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)


def test_finetune_on_an_unknown_modality_is_a_one_line_error(name, references, tmp_path, capsys):
    pt = references(name)
    code = main(["finetune", "--pretrained", str(pt), "--run-dir", str(tmp_path / "ft"), "--no-progress",
                 "--set", "modalities=[hsi]", "--set", "train.device=cpu"])
    assert_one_line_error(code, 2, capsys, "'hsi'", "modalities")
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_pretrain_on_an_unknown_model_names_it(tmp_path, capsys):
    code = main(["pretrain", "--run-dir", str(tmp_path / "run"), "--no-progress", "--set", "model.name=nope"])
    assert_one_line_error(code, 2, capsys, "'nope'", "model.name", *[m for m in MODELS])
    assert not (tmp_path / "run").exists()
