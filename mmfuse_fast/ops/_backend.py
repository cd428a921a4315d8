"""Backend selection shared by the ops: one place decides what "auto" means."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")


# Looked up once at import (not per call, and not behind a cache wrapper that torch.compile would trace through).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, tensor: torch.Tensor, op: str) -> str:
    """Turns "auto" into the concrete backend for this tensor; rejects unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() and op_has_triton(op) else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
        if not (tensor.is_cuda or triton_interpreted()):
            raise RuntimeError(f"{op}: backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1 on the CPU")
        if not op_has_triton(op):
            raise NotImplementedError(f"{op}: the Triton backend is not implemented yet; use backend='reference'")
    return backend


# Ops register here when their Triton implementation lands, so that "auto" picks them up.
TRITON_OPS: set[str] = {"modality_attention", "multiscale_infonce"}


def op_has_triton(op: str) -> bool:
    return op in TRITON_OPS
