"""The engine's training step (engine/step.py) on the CPU: same numbers as the eager fp32 reference step, no host
synchronisation, device LR schedule, non-finite steps skipped and counted, gradient accumulation, AMP; CUDA-graph
capture/replay equality on a GPU."""

import pytest
import torch
from torch.utils.data import default_collate

from mmfuse_fast.config import PretrainConfig, load_config
from mmfuse_fast.engine import NonFiniteLossError, pretrain, read_metrics
from mmfuse_fast.engine.optim import build_optimizer
from mmfuse_fast.engine.schedule import lr_at, lr_tensor
from mmfuse_fast.engine.step import HostSyncError, TrainStep, forbid_host_sync
from reference_step import reference_optimizer, reference_train_step
from mmfuse_fast.models import build_model


def _setup(tiny, *extra, device="cpu", total=6, **step_kw):
    cfg = load_config(PretrainConfig, None, tiny + ["optim.warmup_steps=2", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = build_optimizer(model, cfg.optim, torch.device(device))
    gen = torch.Generator(device).manual_seed(0)
    kw = dict(device=torch.device(device), optim_cfg=cfg.optim, total_steps=total, generator=gen)
    kw.update(step_kw)
    return cfg, model, TrainStep(model, opt, **kw)


def _batch(synthetic, n=4, start=0, **kw):
    ds = synthetic(n=start + n, **kw)
    return default_collate([ds[i] for i in range(start, start + n)])


def test_engine_step_matches_reference_step(tiny_overrides, synthetic):
    cfg, model, step = _setup(tiny_overrides)
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    ref_opt = reference_optimizer(ref, cfg.optim)
    ref_gen = torch.Generator().manual_seed(0)
    for s in range(4):
        batch = _batch(synthetic, start=s)
        r = reference_train_step(ref, batch, ref_opt, cfg.optim, s, 6, ref_gen)
        e = step([batch])
        assert float(e["lr"]) == pytest.approx(lr_at(s, cfg.optim, 6), rel=1e-12)
        for k in ("loss", "loss_rec", "loss_con", "grad_norm"):  # fused vs foreach AdamW: ulp-level differences
            assert float(e[k]) == pytest.approx(float(r[k]), rel=1e-4), (s, k)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)
    m = step.read_metrics()
    assert m["skipped_steps"] == 0 and m["loss"] > 0 and step.acc[:6].abs().sum() == 0  # read resets the sums


def test_step_has_no_host_sync_and_the_check_catches_one(tiny_overrides, synthetic):
    _, model, step = _setup(tiny_overrides)
    batch = _batch(synthetic)
    with forbid_host_sync():
        step([batch])  # forward, backward, clipping, fused AdamW, metric accumulation: no sync
        step([batch])
    forward = model.forward

    def with_item(*a, **k):
        out = forward(*a, **k)
        out["loss"].item()  # a host sync inside the step (docs/method.md, Conventions)
        return out

    model.forward = with_item
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), forbid_host_sync():
        step([batch])

    def with_bool(*a, **k):
        out = forward(*a, **k)
        if out["loss"] > 100:  # bool(tensor): also a sync
            pass
        return out

    model.forward = with_bool
    with pytest.raises(HostSyncError), forbid_host_sync():
        step([batch])
    with pytest.raises(HostSyncError), forbid_host_sync():
        bool(torch.ones(()) > 0)


def test_lr_tensor_matches_lr_at(tiny_overrides):
    cfg = load_config(PretrainConfig, None, tiny_overrides + ["optim.warmup_steps=5", "optim.min_lr=1e-5"])
    for warm in (0, 5):
        cfg.optim.warmup_steps = warm
        for s in range(0, 40):
            got = float(lr_tensor(torch.tensor(float(s), dtype=torch.float64), cfg.optim, 30))
            assert got == pytest.approx(lr_at(s, cfg.optim, 30), rel=1e-12, abs=1e-15), (warm, s)


def test_non_finite_step_is_skipped_counted_and_k_in_a_row_stop(tiny_overrides, synthetic):
    _, model, step = _setup(tiny_overrides, max_bad_steps=2)
    good, bad = _batch(synthetic), _batch(synthetic, nan_at=1)
    step([good])
    before = [p.detach().clone() for p in model.parameters()]
    opt_step = [s["step"].clone() for s in step.optimizer.state.values()]
    out = step([bad])
    assert bool(out["skipped"]) and not torch.isfinite(out["loss"])
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p) and torch.isfinite(p).all()  # nothing moved
    assert [s["step"] for s in step.optimizer.state.values()] == opt_step  # nor AdamW's step count
    step([good])  # the streak is broken
    m = step.read_metrics()
    assert m["skipped_steps"] == 1 and m["loss"] == m["loss"]  # mean over the 2 good steps, finite
    step([bad])
    step([bad])  # 2 in a row: the next read raises, naming the first of them (step 4)
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        step.read_metrics()


def test_pretrain_skips_a_nan_batch_and_finishes(tmp_path, tiny_overrides, synthetic):
    cfg = load_config(PretrainConfig, None, tiny_overrides + [
        "train.steps=4", "train.batch_size=1", "train.log_every=4", "train.checkpoint_every=4",
        "data.splits=[train]", "train.max_bad_steps=2"])
    out = pretrain(cfg, tmp_path / "run", dataset=synthetic(n=4, nan_at=0), progress=False)
    rec = read_metrics(tmp_path / "run")[-1]
    assert out["step"] == 4 and rec["skipped_steps"] == 1 and rec["loss"] == rec["loss"]
    for k in ("samples_per_s", "step_time_ms", "data_pct", "tflops", "peak_mem_mib"):
        assert k in rec, k


def test_grad_accumulation_equals_the_full_batch_without_contrastive(tiny_overrides, synthetic):
    # Without the contrastive term (whose negatives are per micro-batch) and with one mask draw per forward
    # (consistent masks: rand(4, N) == cat(rand(2, N), rand(2, N))), 2 x 2 samples == 1 x 4 samples.
    _, m1, full = _setup(tiny_overrides, "model.contrastive=false", "model.consistent_mask=true")
    _, m2, acc = _setup(tiny_overrides, "model.contrastive=false", "model.consistent_mask=true",
                           grad_accum_steps=2)
    for s in range(2):
        batch = _batch(synthetic, start=s)
        halves = [{k: v[:2] for k, v in batch.items() if k != "id"}, {k: v[2:] for k, v in batch.items() if k != "id"}]
        a, b = full([batch]), acc(halves)
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="micro-batches"):
        acc([batch])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_runs_and_stays_finite(tiny_overrides, synthetic, amp):
    _, model, step = _setup(tiny_overrides, amp=amp)
    for s in range(3):
        out = step([_batch(synthetic, start=s)])
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(p).all() for p in model.parameters())
    m = step.read_metrics()
    if amp == "fp16":
        assert m["loss_scale"] > 0 and "overflow_steps" in m
        assert "scale" in step.state_dict()


def test_config_validates_engine_keys(tiny_overrides):
    from mmfuse_fast.config import ConfigError

    for bad in ("train.amp=fp8", "train.distributed=zero3", "train.grad_accum_steps=0", "train.max_bad_steps=0",
                "train.grad_accum_steps=3"):  # batch_size 8 is no multiple of 3
        with pytest.raises(ConfigError):
            load_config(PretrainConfig, None, tiny_overrides + [bad])


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_graph_replay_equals_eager(tiny_overrides, synthetic, amp):
    _, m1, eager = _setup(tiny_overrides, "model.ops_backend=auto", device="cuda", amp=amp, cuda_graph=False)
    _, m2, graph = _setup(tiny_overrides, "model.ops_backend=auto", device="cuda", amp=amp, cuda_graph=True)
    for s in range(5):
        batch = _batch(synthetic, start=s)
        a = {k: v.clone() for k, v in eager([batch]).items()}
        b = graph([{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}])
        assert graph.graph is not None
        for k in ("loss", "loss_rec", "loss_con", "grad_norm"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"step {s} {k}")
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert eager.read_metrics() == pytest.approx(graph.read_metrics())
    assert m1.cfg and eager.generator.get_state().equal(graph.generator.get_state())


@pytest.mark.gpu
def test_pretrain_on_cuda_with_graph_and_compile(tmp_path, tiny_overrides, synthetic):
    for compile_ in (False, True):
        cfg = load_config(PretrainConfig, None, tiny_overrides + [
            "model.ops_backend=auto", "train.steps=6", "train.log_every=3", "train.batch_size=4",
            f"train.compile={str(compile_).lower()}"])
        out = pretrain(cfg, tmp_path / f"c{compile_}", dataset=synthetic(n=8), progress=False)
        rec = read_metrics(tmp_path / f"c{compile_}")[-1]
        assert out["step"] == 6 and rec["loss"] == rec["loss"] and rec["peak_mem_mib"] > 0
