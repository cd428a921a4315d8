"""The run directory: every artifact's name, holding a run directory, finding a run, and reading and writing its
configs and task info.

A pretraining run::

    run.lock                held (flock) by the process running in the directory; names its pid and host
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
import warnings
from pathlib import Path

import yaml

from mmfuse_fast.config import (BaseModelConfig, ModelConfig, PretrainConfig, from_dict, load_config,
                                model_config_class, save_config, to_dict)
from mmfuse_fast.engine.checkpoint import (CHECKPOINT_DIR, LATEST_NAME, STATE_NAME, WEIGHTS_NAME, LoadedCheckpoint,
                                           atomic_write_text, complete_checkpoints, discard_partial_checkpoints,
                                           incomplete_checkpoints, read_newest_checkpoint)
from mmfuse_fast.errors import CheckpointError, ConfigError, RunDirError
from mmfuse_fast.file_lock import FileLock, LockHeld

__all__ = ["CONFIG_NAME", "MODEL_CONFIG_NAME", "LABEL_SUBSET_NAME", "TASK_NAME", "METRICS_NAME", "CHECKPOINT_DIR",
           "LATEST_NAME", "WEIGHTS_NAME", "STATE_NAME", "TENSORBOARD_DIR", "LOCK_NAME", "RunDirLock",
           "eval_metrics_path", "prepare_run_dir", "find_run_dir", "write_run_configs", "read_backbone_config",
           "read_task_info", "write_task_info", "write_json", "json_safe"]

CONFIG_NAME = "config.yaml"
MODEL_CONFIG_NAME = "model.yaml"
LABEL_SUBSET_NAME = "label_subset.json"
TASK_NAME = "task.json"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_NAME = "run.lock"


def eval_metrics_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"metrics_{split}.json"


class RunDirLock:
    """An exclusive hold on a directory (a run directory, a sweep directory) for as long as one process works in
    it: a `FileLock` on its run.lock (mmfuse_fast/file_lock.py: dropped by the kernel when the holder dies; names
    the holder for the error a second process gets)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._lock = FileLock(self.directory / LOCK_NAME)

    @property
    def held(self) -> bool:
        return self._lock.held

    def acquire(self) -> "RunDirLock":
        """Creates the directory if needed and takes the lock; a RunDirError when another process holds it."""
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise RunDirError(f"run directory {directory} exists and is not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except LockHeld as held:
            holder = f" ({held.holder})" if held.holder else ""
            raise RunDirError(f"{directory} is in use by another run{holder}; wait for it to end or choose "
                              f"another directory") from None
        except OSError as error:
            raise RunDirError(f"cannot use run directory {directory}: {error.strerror or error}") from None
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_run_dir(run_dir: str | Path, resume: bool, holder: bool = True) -> tuple[Path, LoadedCheckpoint | None]:
    """Checks the run directory (held by this run's RunDirLock); returns (run_dir, the checkpoint to resume from,
    read into memory, or None).

    A directory that already holds a checkpoint is never overwritten: without `resume` that is an error. With
    `resume` the newest checkpoint that loads is used (engine.checkpoint.read_newest_checkpoint); with none yet,
    training starts from step 0. Folders of saves that never finished are ignored, and removed by the `holder`
    (the process holding the lock; other ranks of a distributed run only read)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    if holder:
        discard_partial_checkpoints(run_dir)
    complete = complete_checkpoints(run_dir)
    if complete and not resume:
        raise RunDirError(
            f"run directory {run_dir} already holds a checkpoint ({complete[0].name}); pass resume=True (--resume) "
            f"to continue it, or choose another run directory"
        )
    for folder in incomplete_checkpoints(run_dir):
        missing = [name for name in (WEIGHTS_NAME, STATE_NAME) if not (folder / name).is_file()]
        warnings.warn(f"ignoring incomplete checkpoint folder {folder} (no {' or '.join(missing)})", stacklevel=2)
    ckpt = read_newest_checkpoint(run_dir) if resume else None
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
            values = yaml.safe_load(f) or {}
        # the model section alone: a pretraining config would check its modalities against a default dataset
        return from_dict(model_config_class(values.get("name", ModelConfig.name)), values)
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
