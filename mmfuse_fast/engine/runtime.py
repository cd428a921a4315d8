"""Run directories, device choice and seeding, shared by the training entry points."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from mmfuse_fast.engine.checkpoint import CHECKPOINT_DIR, latest_checkpoint
from mmfuse_fast.errors import RunDirError

__all__ = ["RunDirError", "resolve_device", "seed_everything", "prepare_run_dir"]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config key 'train.device' is {name!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: str | Path, resume: bool) -> tuple[Path, Path | None]:
    """Creates the run directory; returns (run_dir, checkpoint to resume from or None).

    A directory that already holds a checkpoint is never overwritten: without `resume` that is an error. With
    `resume` and no checkpoint yet, training starts from step 0."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None and (run_dir / CHECKPOINT_DIR).is_dir() and any((run_dir / CHECKPOINT_DIR).iterdir()):
        raise RunDirError(f"{run_dir / CHECKPOINT_DIR} holds files but no 'latest' pointer; move it away first")
    if ckpt is not None and not resume:
        raise RunDirError(
            f"run directory {run_dir} already holds a checkpoint ({ckpt.name}); pass resume=True (--resume) to "
            f"continue it, or choose another run directory"
        )
    if resume and ckpt is None:
        print(f"note: no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
    return run_dir, ckpt


def validate_config(cfg) -> None:
    """The checks that need the registries or the run's purpose; the dataclasses in config.py check each value's
    type and range themselves when they are built. Raises ConfigError naming the key."""
    from mmfuse_fast.config import require as need
    from mmfuse_fast.data import DATASETS
    from mmfuse_fast.models import MODELS

    model = getattr(cfg, "model", None)
    if model is not None:
        need(model.name in MODELS, "model.name", f"is {model.name!r}; known models: {', '.join(sorted(MODELS))}")
    need(cfg.data.dataset in DATASETS, "data.dataset", f"is {cfg.data.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    need(bool(cfg.data.splits), "data.splits", "is empty")
    need("test" not in cfg.data.splits, "data.splits", "includes 'test': training never sees the test split")
    need(cfg.train.device in ("auto", "cpu") or cfg.train.device.startswith("cuda"), "train.device",
         f"must be auto, cpu or cuda[:N], got {cfg.train.device!r}")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(len(cfg.optim.betas) == 2, "optim.betas", "must hold two numbers")