"""End-to-end demo on the real BigEarthNet v2 sample, on the CPU in a few minutes (`make demo`).

1. fetch the sample (or use $MMFUSE_BEN_V2_ROOT / --data-root),
2. pretrain the `tiny` config on train + validation,
3. fit a multi-label linear probe on the train split,
4. evaluate it on the test split (micro/macro mAP, sample F1),
5. plot the loss curves and masked reconstructions.

Everything goes to --run-dir (default runs/demo)::

    runs/demo/pretrain/        pretraining run (config.yaml, metrics.jsonl, checkpoints/)
    runs/demo/finetune/        linear-probe run (config.yaml, model.yaml, label_subset.json, metrics.jsonl,
                               checkpoints/, metrics_test.json)
    runs/demo/metrics.json     the test metrics and timings
    runs/demo/loss_curve.png   pretraining loss (total / reconstruction / contrastive)
    runs/demo/reconstructions.png

A re-run deletes exactly these entries of its run directory first and starts over.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from mmfuse_fast.config import FinetuneConfig, PretrainConfig, load_config

OUTPUTS = ("pretrain", "finetune", "metrics.json", "loss_curve.png", "reconstructions.png")


def _clean(run_dir: Path) -> None:
    for name in OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _table(metrics: dict) -> str:
    rows = [("mAP (micro)", metrics["map_micro"]), ("mAP (macro)", metrics["map_macro"]),
            ("F1 (samples)", metrics["f1_samples"])]
    lines = [f"test split, {metrics['n_samples']} samples ({metrics['n_classes_scored']} classes with positives)",
             f"{'metric':<14}{'value':>8}", "-" * 22]
    lines += [f"{name:<14}{100 * value:>7.1f}%" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfuse_fast.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: tiny.yaml's)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="linear-probe steps (default: 200)")
    parser.add_argument("--data-root", default=None, help="BigEarthNet v2 root (default: $MMFUSE_BEN_V2_ROOT or "
                                                           "the sample, fetched into the cache)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: torch's default, one per core; on a machine shared with "
                             "other jobs, 1 keeps the tiny model's small ops from fighting over the cores)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from mmfuse_fast.data import fetch_bigearthnet_v2_sample
    from mmfuse_fast.engine import evaluate, finetune, pretrain
    from mmfuse_fast.engine.rundir import write_json
    from mmfuse_fast.engine.plots import plot_loss_curves, plot_reconstructions
    from mmfuse_fast.models import build_model
    from mmfuse_fast.engine.checkpoint import load_weights

    t0 = time.perf_counter()
    progress = not args.no_progress
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean(run_dir)

    root = Path(args.data_root) if args.data_root else fetch_bigearthnet_v2_sample()
    print(f"data: BigEarthNet v2 sample at {root}")

    # 1. pretraining on train + validation (never test)
    pre_overrides = [f"data.root={root}", "data.splits=[train, validation]"]
    if args.steps is not None:
        pre_overrides.append(f"train.steps={args.steps}")
        pre_overrides.append(f"train.checkpoint_every={max(1, args.steps)}")
    pre_cfg = load_config(PretrainConfig, "tiny", pre_overrides)
    print(f"[1/3] pretraining the tiny model for {pre_cfg.train.steps} steps (batch {pre_cfg.train.batch_size})")
    pre = pretrain(pre_cfg, run_dir / "pretrain", progress=progress)

    # 2. multi-label linear probe on the train split, evaluated on test
    ft_overrides = [f"pretrained={run_dir / 'pretrain'}", f"data.root={root}", "data.splits=[train]",
                    "mode=linear", "eval_split=test"]
    if args.finetune_steps is not None:
        ft_overrides.append(f"train.steps={args.finetune_steps}")
        ft_overrides.append(f"train.checkpoint_every={max(1, args.finetune_steps)}")
    ft_cfg = load_config(FinetuneConfig, None, ft_overrides)
    print(f"[2/3] linear probe for {ft_cfg.train.steps} steps on the train split, evaluated on test")
    ft = finetune(ft_cfg, run_dir / "finetune", progress=progress)
    test = ft["eval"] if "eval" in ft else evaluate(run_dir / "finetune", split="test", progress=progress)

    # 3. figures
    print("[3/3] plots")
    loss_png = plot_loss_curves(run_dir / "pretrain", run_dir / "loss_curve.png",
                                title="tiny pretraining on the BigEarthNet v2 sample")
    model = build_model(pre_cfg.model)
    load_weights(model, run_dir / "pretrain")
    from mmfuse_fast.data import build_dataset

    val = build_dataset(pre_cfg.data, ["validation"], bands=pre_cfg.model.modalities)
    batch = torch.utils.data.default_collate([val[i] for i in range(min(4, len(val)))])
    recon_png = plot_reconstructions(model, batch, run_dir / "reconstructions.png",
                                     generator=torch.Generator().manual_seed(0))

    wall = time.perf_counter() - t0
    summary = {
        "test": {k: test[k] for k in ("map_micro", "map_macro", "f1_samples", "n_samples", "n_classes_scored")},
        "ap_per_class": test.get("ap_per_class"),
        "pretrain": {"steps": pre["step"], "final": pre["metrics"], "wall_s": pre["wall_s"]},
        "finetune": {"steps": ft["step"], "final": ft["metrics"], "wall_s": ft["wall_s"]},
        "wall_s": round(wall, 1),
        "files": {"loss_curve": str(loss_png), "reconstructions": str(recon_png)},
    }
    write_json(run_dir / "metrics.json", summary)
    print()
    print(_table(test))
    print()
    print(f"saved {run_dir / 'metrics.json'}, {loss_png}, {recon_png}  (total {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
