"""Checkpoints: safetensors weights + a separate training-state file, written atomically.

Layout inside a run directory::

    checkpoints/
      step_000100/
        model.safetensors   model weights (safetensors; loads into the reference or the fast model alike)
        train_state.pt      optimizer state, step, RNG states, data position, config hash (tensors and
                            plain Python values only: read back with torch.load(weights_only=True))
      step_000200/ ...
      latest                text file naming the newest complete checkpoint directory

Every file is written to a temporary file in its destination directory, fsynced, then `os.replace`d into place,
and `latest` is updated (atomically, the same way) only once both files of a checkpoint are complete. An
interrupted save therefore leaves the previous checkpoint and the `latest` pointer untouched. Only the newest
`keep` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmfuse_fast.config import to_dict
from mmfuse_fast.engine.distributed import unwrap_model
from mmfuse_fast.errors import CheckpointError

# the checkpoint layout inside a run directory (engine/rundir.py names the rest of the run's files)
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "train_state.pt"
CHECKPOINT_DIR = "checkpoints"
LATEST_NAME = "latest"

_STEP_DIR = re.compile(r"^step_(\d+)$")

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "atomic_write",
    "save_weights",
    "load_weights",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resolve_weights",
    "config_hash",
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
    tensors = load_file(str(path), device=str(device) if device.type != "meta" else "cpu")
    own = target.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"weights in {path} do not match the model: "
            f"{len(missing)} missing key(s) {_short(missing)}, {len(unexpected)} unexpected key(s) {_short(unexpected)}"
        )
    mismatched = [k for k in tensors if k in own and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if mismatched:
        details = ", ".join(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5])
        raise CheckpointError(f"weights in {path} have different shapes: {details}")
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
        raise CheckpointError(f"no checkpoint found in {path} (expected {CHECKPOINT_DIR}/{LATEST_NAME})")
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


def config_hash(config) -> str:
    """sha256 over the resolved config, ignoring keys that do not change the computation (steps, logging and
    checkpoint intervals, device, workers, data root)."""
    values = to_dict(config)

    def strip(node, prefix=()):
        if isinstance(node, dict):
            # unset optional keys (None) are left out: adding one does not change the hash of existing runs
            return {k: strip(v, prefix + (k,)) for k, v in sorted(node.items())
                    if prefix + (k,) not in _HASH_EXCLUDE and v is not None
                    and not (prefix + (k,) in _HASH_NEUTRAL and v == _HASH_NEUTRAL[prefix + (k,)])}
        return node

    return hashlib.sha256(repr(strip(values)).encode()).hexdigest()[:16]


# --- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run (via `checkpoints/latest`), or None."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    if not ((ckpt / WEIGHTS_NAME).is_file() and (ckpt / STATE_NAME).is_file()):
        raise CheckpointError(f"{pointer} names {ckpt}, which is incomplete or missing")
    return ckpt


def checkpoint_step(ckpt: str | Path) -> int | None:
    """The step a checkpoint directory (`step_<step>`) was written at, or None for another name."""
    match = _STEP_DIR.match(Path(ckpt).name)
    return int(match.group(1)) if match else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    keep: int = 2,
    metadata: dict[str, str] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes checkpoints/step_<step>/{model.safetensors, train_state.pt}, then points `latest` at it."""
    root = checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    ckpt = root / name
    ckpt.mkdir(parents=True, exist_ok=True)
    save_weights(model, ckpt / WEIGHTS_NAME, metadata={"step": str(step), **(metadata or {})},
                 state_dict=model_state)
    atomic_write(ckpt / STATE_NAME, lambda tmp: torch.save({"step": step, **state}, tmp))
    atomic_write_text(root / LATEST_NAME, name + "\n")
    _prune(root, keep, current=name)
    return ckpt


def _prune(root: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))
    for _, p in steps[:-keep]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: str | Path, model: torch.nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Loads a checkpoint (its directory, or a run directory -> latest): weights into `model` (if given) and the
    training state, read with torch.load(weights_only=True)."""
    path = Path(path)
    ckpt = path if (path / STATE_NAME).is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint found in {path}")
    if model is not None:
        load_weights(model, ckpt / WEIGHTS_NAME)
    return torch.load(ckpt / STATE_NAME, map_location=map_location, weights_only=True)
