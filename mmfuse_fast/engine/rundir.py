"""The run directory: every artifact's name, finding a run, and reading and writing its configs and task info.

A pretraining run::

    config.yaml             the resolved PretrainConfig
    metrics.jsonl           one line per log interval
    checkpoints/            step_NNNNNN/{model.safetensors, train_state.pt} and the `latest` pointer
    tensorboard/            the same metrics for TensorBoard, when it is installed

A fine-tuning run adds::

    model.yaml              the backbone's model config (what evaluate and predict rebuild the classifier from)
    label_subset.json       the training samples drawn for label_fraction (indices into the training set + ids)
    task.json               task, num_classes, ignore_index, class names, normalization statistics (by band)
    metrics_<split>.json    evaluation metrics of a split, with the data they were computed on
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from mmfuse_fast.config import BaseModelConfig, PretrainConfig, from_dict, load_config, save_config, to_dict
from mmfuse_fast.engine.checkpoint import (CHECKPOINT_DIR, LATEST_NAME, STATE_NAME, WEIGHTS_NAME, atomic_write_text,
                                           latest_checkpoint)
from mmfuse_fast.errors import CheckpointError, ConfigError, RunDirError

__all__ = ["CONFIG_NAME", "MODEL_CONFIG_NAME", "LABEL_SUBSET_NAME", "TASK_NAME", "METRICS_NAME", "CHECKPOINT_DIR",
           "LATEST_NAME", "WEIGHTS_NAME", "STATE_NAME", "TENSORBOARD_DIR", "eval_metrics_path", "prepare_run_dir", "find_run_dir",
           "write_run_configs", "read_backbone_config", "read_task_info", "write_task_info", "write_json",
           "json_safe"]

CONFIG_NAME = "config.yaml"
MODEL_CONFIG_NAME = "model.yaml"
LABEL_SUBSET_NAME = "label_subset.json"
TASK_NAME = "task.json"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def eval_metrics_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"metrics_{split}.json"


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


def find_run_dir(path: str | Path) -> Path | None:
    """The run directory holding `path` (a run directory, a checkpoint directory or a weights file in it): the
    nearest of it and its parents with a config.yaml."""
    path = Path(path)
    path = path if path.is_dir() else path.parent
    for parent in [path, *path.parents][:4]:
        if (parent / CONFIG_NAME).is_file():
            return parent
    return None


def json_safe(value):
    """`value` with NaN floats (e.g. the AP of a class without positives) as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def write_json(path: str | Path, record: dict) -> None:
    """`record` as indented JSON (NaN as null), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(record), indent=1) + "\n")


def write_run_configs(run_dir: Path, cfg, backbone: BaseModelConfig | None = None) -> None:
    """config.yaml (the resolved config) and, for a run on a backbone (fine-tuning), model.yaml."""
    save_config(cfg, run_dir / CONFIG_NAME)
    if backbone is not None:
        atomic_write_text(run_dir / MODEL_CONFIG_NAME, yaml.safe_dump(to_dict(backbone), sort_keys=False))


def read_backbone_config(pretrained: str | Path, key: str = "pretrained") -> BaseModelConfig:
    """The model config of a run (pretraining: its config.yaml's model section; fine-tuning: its model.yaml), given
    the run directory, a checkpoint directory or a weights file in it. `key` names the config key in errors."""
    path = Path(pretrained)
    if not path.exists():
        raise ConfigError(f"config key '{key}': {path} does not exist")
    run_dir = find_run_dir(path)
    if run_dir is None:
        raise ConfigError(f"config key '{key}': no {CONFIG_NAME} found in {path} or its parents")
    if (run_dir / MODEL_CONFIG_NAME).is_file():  # a fine-tuning run
        with open(run_dir / MODEL_CONFIG_NAME) as f:
            return from_dict(PretrainConfig, {"model": yaml.safe_load(f) or {}}).model
    return load_config(PretrainConfig, run_dir / CONFIG_NAME).model


def read_task_info(run_dir: str | Path) -> dict:
    """task.json of a fine-tuning run; runs from before it existed are multilabel BigEarthNet runs."""
    path = Path(run_dir) / TASK_NAME
    if not path.is_file():
        return {"task": "multilabel", "num_classes": 19, "ignore_index": None, "classes": None, "stats": None}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def write_task_info(run_dir: Path, info: dict) -> None:
    write_json(Path(run_dir) / TASK_NAME, info)
