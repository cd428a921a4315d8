"""Checkpoints: safetensors weights + a separate training-state file, in step folders that appear whole or not at all.

Layout inside a run directory::

    checkpoints/
      step_000100/
        model.safetensors   model weights (safetensors; loads into the reference or the fast model alike)
        train_state.pt      optimizer state, step, RNG states, data position, config hash and values (tensors
                            and plain Python values only: read back with torch.load(weights_only=True))
      step_000200/ ...
      latest                text file naming the newest checkpoint directory (for people and scripts)

A checkpoint is written into a hidden sibling folder (`.partial-step_000100-<pid>`), both files fsynced, and the
folder renamed to `step_000100` (then the parent directory is fsynced), so a step folder holds both files or does
not exist: a kill or a full disk during any save, the first included, leaves the previous checkpoints as they were.
The checkpoint a run resumes from is the newest `step_*` folder holding both files whose files load
(`read_newest_checkpoint`); partial folders and folders without both files are never read. Only the newest `keep`
checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmfuse_fast.config import to_dict
from mmfuse_fast.engine.distributed import unwrap_model
from mmfuse_fast.errors import CheckpointError

# the checkpoint layout inside a run directory (engine/rundir.py names the rest of the run's files)
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "train_state.pt"
CHECKPOINT_DIR = "checkpoints"
LATEST_NAME = "latest"

PARTIAL_PREFIX = ".partial-"  # a checkpoint folder being written (or left by a killed save): never read

_STEP_DIR = re.compile(r"^step_(\d+)$")

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "LoadedCheckpoint",
    "atomic_write",
    "save_weights",
    "load_weights",
    "apply_weights",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "read_newest_checkpoint",
    "latest_checkpoint",
    "complete_checkpoints",
    "incomplete_checkpoints",
    "discard_partial_checkpoints",
    "resolve_weights",
    "config_hash",
    "hashed_config_values",
    "config_differences",
    "rng_state",
    "set_rng_state",
]


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (and one at the end)
    keep: int = 2  # newest checkpoints kept; older ones are deleted


# --- atomic files ------------------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` on a temporary file next to `path`, fsyncs it and renames it over `path`.

    If `write` raises, the temporary file is removed and `path` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- weights -----------------------------------------------------------------------------------------------------


def _weights_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = unwrap_model(model).state_dict()
    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()  # safetensors refuses tensors sharing storage (tied weights): store a copy
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t.contiguous().cpu()
    return out


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Writes the model's state_dict (or the given full `state_dict`, e.g. gathered from FSDP2) as safetensors,
    atomically."""
    tensors = _weights_dict(model) if state_dict is None else {
        k: v.detach().contiguous().cpu().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {}))


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> torch.nn.Module:
    """Loads safetensors weights (a file, a checkpoint directory or a run directory) into `model`.

    With `strict`, any missing or unexpected key raises a CheckpointError listing them."""
    path = resolve_weights(path)
    target = unwrap_model(model)
    device = next(iter(target.state_dict().values()), torch.empty(0)).device
    try:
        tensors = load_file(str(path), device=str(device) if device.type != "meta" else "cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} does not load ({_reason(error)})") from None
    return apply_weights(model, tensors, path, strict)


def apply_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path,
                  strict: bool = True) -> torch.nn.Module:
    """Loads `tensors` (read from `source`, which errors name) into `model`; with `strict`, missing or unexpected
    keys raise a CheckpointError listing them."""
    target = unwrap_model(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"weights in {source} do not match the model: "
            f"{len(missing)} missing key(s) {_short(missing)}, {len(unexpected)} unexpected key(s) {_short(unexpected)}"
        )
    mismatched = [k for k in tensors if k in own and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if mismatched:
        details = ", ".join(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5])
        raise CheckpointError(f"weights in {source} have different shapes: {details}")
    target.load_state_dict(tensors, strict=strict)
    return model


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "[]"
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + more + "]"


def resolve_weights(path: str | Path) -> Path:
    """A .safetensors file as is; a checkpoint directory -> its model.safetensors; a run directory -> the weights
    of its latest checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest / WEIGHTS_NAME
        raise CheckpointError(f"no checkpoint found in {path} (expected {CHECKPOINT_DIR}/step_*/ holding "
                              f"{WEIGHTS_NAME} and {STATE_NAME})")
    raise CheckpointError(f"weights path {path} does not exist")


# --- RNG and config ----------------------------------------------------------------------------------------------


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Global RNG states (torch CPU, CUDA, numpy, random) plus named generators, as tensors/plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])


def _python_state_to_plain(s):
    version, internal, gauss = s
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_plain(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])


# Keys that may change between a run and its resumption without changing what is computed.
_HASH_EXCLUDE = {("train", "steps"), ("train", "log_every"), ("train", "checkpoint_every"), ("train", "device"),
                 ("train", "cuda_graph"), ("train", "compile"), ("train", "max_bad_steps"),
                 ("data", "num_workers"), ("data", "root"), ("eval_split",)}
# Keys added after runs existed, at the value that computes what those runs computed: left out of the hash at that
# value, so existing runs still resume.
_HASH_NEUTRAL = {("model", "sensor_drop"): 0.0, ("model", "encoder_fusion"): "joint",
                 ("model", "decoder_context"): "all", ("optim", "grad_clip_mode"): "global", ("modalities",): [],
                 ("label_seed",): 0, ("layer_decay",): 1.0, ("drop_path",): 0.0}


def hashed_config_values(config) -> dict:
    """The values of the resolved config that its hash covers: every key but those that do not change the
    computation, unset optional keys (None: adding one does not change the hash of existing runs) and keys at their
    neutral value."""

    def strip(node, prefix=()):
        if isinstance(node, dict):
            return {k: strip(v, prefix + (k,)) for k, v in sorted(node.items())
                    if prefix + (k,) not in _HASH_EXCLUDE and v is not None
                    and not (prefix + (k,) in _HASH_NEUTRAL and v == _HASH_NEUTRAL[prefix + (k,)])}
        return node

    return strip(to_dict(config))


def config_hash(config) -> str:
    """sha256 over the resolved config, ignoring keys that do not change the computation (steps, logging and
    checkpoint intervals, device, workers, data root)."""
    return hashlib.sha256(repr(hashed_config_values(config)).encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two `hashed_config_values` (a key
    missing on one side, i.e. unset or at its neutral value, shows as `unset`)."""

    def flatten(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out.update(flatten(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a, b = flatten(old), flatten(new)
    return [f"{key}: {a.get(key, 'unset')!r} -> {b.get(key, 'unset')!r}"
            for key in sorted(set(a) | set(b)) if _plain(a.get(key, "unset")) != _plain(b.get(key, "unset"))]


def _plain(value):
    """Tuples as lists: a config read back from a checkpoint has lists where the dataclasses hold tuples."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(ckpt: str | Path) -> int | None:
    """The step a checkpoint directory (`step_<step>`) was written at, or None for another name."""
    match = _STEP_DIR.match(Path(ckpt).name)
    return int(match.group(1)) if match else None


def _step_dirs(run_dir: str | Path) -> list[Path]:
    """The `step_*` folders of a run, newest (highest step) first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _is_complete(ckpt: Path) -> bool:
    return (ckpt / WEIGHTS_NAME).is_file() and (ckpt / STATE_NAME).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a run that hold both files, newest first."""
    return [p for p in _step_dirs(run_dir) if _is_complete(p)]


def incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """`step_*` folders that lack a file (left by an interrupted save of an older version, or damaged by hand)."""
    return [p for p in _step_dirs(run_dir) if not _is_complete(p)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run that holds both files, or None."""
    complete = complete_checkpoints(run_dir)
    return complete[0] if complete else None


def discard_partial_checkpoints(run_dir: str | Path) -> None:
    """Removes the folders of saves that never finished (killed mid-save). Only while holding the run directory:
    another process's save in progress looks the same."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    keep: int = 2,
    metadata: dict[str, str] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes checkpoints/step_<step>/{model.safetensors, train_state.pt} (whole or not at all: see the module
    docstring), points `latest` at it and prunes to the newest `keep`. A write that fails for lack of space or
    permission raises a CheckpointError naming the folder; the previous checkpoints are untouched."""
    root = checkpoint_root(run_dir)
    name = step_dir_name(step)
    ckpt = root / name
    staging = root / f"{PARTIAL_PREFIX}{name}-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed process that had this pid
        staging.mkdir(parents=True)
        save_weights(model, staging / WEIGHTS_NAME, metadata={"step": str(step), **(metadata or {})},
                     state_dict=model_state)
        atomic_write(staging / STATE_NAME, lambda tmp: torch.save({"step": step, **state}, tmp))
        _move_into_place(staging, ckpt)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"could not write checkpoint {ckpt} ({error}); earlier checkpoints are "
                                  f"untouched") from error
        raise
    try:
        atomic_write_text(root / LATEST_NAME, name + "\n")
    except OSError as error:  # the step folder is whole and found without the pointer
        warnings.warn(f"could not update {root / LATEST_NAME} ({error})", stacklevel=2)
    _prune(run_dir, keep, current=name)
    return ckpt


def _move_into_place(staging: Path, ckpt: Path) -> None:
    """Renames the finished folder `staging` to `ckpt`, replacing a folder of the same step (one written again after
    a resume from an older checkpoint)."""
    if ckpt.exists():
        replaced = ckpt.parent / f"{PARTIAL_PREFIX}{ckpt.name}-replaced-{os.getpid()}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(ckpt, replaced)
        os.rename(staging, ckpt)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(staging, ckpt)
    _fsync_dir(ckpt.parent)


def _prune(run_dir: str | Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    for p in _step_dirs(run_dir)[keep:]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into host memory: its folder, its weights and its training state."""

    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def read_checkpoint(ckpt: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Reads both files of a checkpoint folder (the weights to the CPU); a file that does not load (truncated,
    corrupt, missing) raises a CheckpointError naming it."""
    ckpt = Path(ckpt)
    weights_path, state_path = ckpt / WEIGHTS_NAME, ckpt / STATE_NAME
    try:
        weights = load_file(str(weights_path), device="cpu")
    except Exception as error:
        raise CheckpointError(f"{weights_path} does not load ({_reason(error)})") from None
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{state_path} does not load ({_reason(error)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{state_path} does not load (not a training state)")
    return LoadedCheckpoint(ckpt, weights, state)


def _reason(error: Exception) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 160 else text[:157] + "..."


def read_newest_checkpoint(run_dir: str | Path) -> LoadedCheckpoint | None:
    """The newest checkpoint of a run whose files load, or None when it has none. A newer one that does not load
    is skipped with a warning naming the file; when none loads, a CheckpointError names every file."""
    failures = []
    for ckpt in complete_checkpoints(run_dir):
        try:
            loaded = read_checkpoint(ckpt)
        except CheckpointError as error:
            failures.append(str(error))
            continue
        for failure in failures:
            warnings.warn(f"skipping checkpoint: {failure}; resuming from {ckpt.name} instead", stacklevel=2)
        return loaded
    if failures:
        raise CheckpointError(f"no checkpoint of {run_dir} loads: {'; '.join(failures)}")
    return None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Loads a checkpoint (its directory, or a run directory -> its newest checkpoint): weights into `model` (if
    given) and the training state, read with torch.load(weights_only=True)."""
    path = Path(path)
    ckpt = path if (path / STATE_NAME).is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint found in {path}")
    loaded = read_checkpoint(ckpt, map_location)
    if model is not None:
        apply_weights(model, loaded.weights, ckpt / WEIGHTS_NAME)
    return loaded.state
