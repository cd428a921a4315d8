"""Backend names of the ops and whether they can run: the one place that turns a `backend=` argument into the path
that runs (the contract of each op and its backends: docs/architecture.md, "Ops and kernels").

    op                   backends                               auto
    modality_attention   reference, triton                      triton for CUDA tensors (not float64), else reference
    multiscale_infonce   reference, chunked, triton             triton for CUDA tensors (not float64), else chunked
    crop_resize          reference, extension, triton (= auto)  extension where it has a kernel, else reference

`model.ops_backend` ("auto" | "triton" | "reference") is passed to every op the model calls; crop_resize has no
Triton kernel and takes "triton" as its fast path, the same as "auto".
"""

from __future__ import annotations

import importlib.util
import os

import torch

from mmfuse_fast.errors import ConfigError
from mmfuse_fast.ops import _extension

# The values of the config key `model.ops_backend`.
MODEL_BACKENDS = ("auto", "triton", "reference")

OP_BACKENDS = {
    "modality_attention": ("auto", "reference", "triton"),
    "multiscale_infonce": ("auto", "reference", "chunked", "triton"),
    "crop_resize": ("auto", "reference", "extension", "triton"),
}

# The path "auto" takes for an op where Triton does not run.
_TRITON_FALLBACK = {"modality_attention": "reference", "multiscale_infonce": "chunked"}

# Looked up once at import (not per call, and not behind a cache wrapper that torch.compile would trace through).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device) -> str | None:
    """Why Triton kernels cannot run on `device` (a torch.device or its name), or None when they can."""
    if not triton_available():
        return "the triton package is not installed (pip install triton)"
    device_type = torch.device(device).type
    if device_type != "cuda" and not triton_interpreted():
        return (f"the device is {device_type} and Triton needs a CUDA device (or TRITON_INTERPRET=1 to run its "
                "interpreter on the CPU)")
    return None


def resolve(backend: str, where, op: str, *, dtype: torch.dtype | None = None) -> str:
    """The backend of `op` that runs for inputs on `where` (a tensor or a device) of `dtype` (default: the tensor's).

    Unknown names raise ValueError listing the op's backends; a named backend that cannot run here raises
    RuntimeError saying why."""
    valid = OP_BACKENDS[op]
    if backend not in valid:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {', '.join(valid)}")
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if op == "crop_resize":
        return _resolve_crop_resize(backend, device)
    if dtype is None:
        dtype = where.dtype if isinstance(where, torch.Tensor) else torch.float32
    if backend == "auto":
        # the kernels compute in fp32: float64 inputs take the exact PyTorch path
        fast = device.type == "cuda" and triton_available() and dtype != torch.float64
        return "triton" if fast else _TRITON_FALLBACK[op]
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend='triton' cannot run here: {reason}")
    return backend


def _resolve_crop_resize(backend: str, device: torch.device) -> str:
    if backend == "reference":
        return backend
    if _extension.has_kernel("crop_resize", device.type):
        return "extension"
    if backend == "extension":
        reason = "is not built" if not _extension.AVAILABLE else f"has no {device.type} kernel"
        raise RuntimeError(f"crop_resize: backend='extension' but mmfuse_fast._C {reason} "
                           f"({_extension.LOAD_ERROR}); build it with `pip install --no-build-isolation -e .`")
    return "reference"  # "auto" and "triton" without the extension


def check_backend_available(backend: str, device) -> None:
    """Raises ConfigError when `model.ops_backend = backend` cannot run on `device` (a torch.device or its name).

    For the engine to call before building anything, so that a run fails with one clear line instead of a traceback
    from inside the first step. "auto" and "reference" run everywhere."""
    if backend not in MODEL_BACKENDS:
        raise ConfigError(f"config key 'model.ops_backend' is {backend!r}; expected one of {', '.join(MODEL_BACKENDS)}")
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ConfigError(f"config key 'model.ops_backend' is 'triton' but Triton cannot run here: {reason}")
