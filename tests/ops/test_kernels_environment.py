"""The test environment's Triton: the dev extra requires an interpreter that runs with the numpy it may get."""

import re
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def test_dev_extra_requires_a_triton_whose_interpreter_runs_on_numpy_2_4():
    """Interpreters before Triton 3.7 call int() on 1-element arrays (a tensor used as a loop bound), which numpy
    >= 2.4 rejects; the InfoNCE repair kernel loops over such a bound."""
    dev = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["dev"]
    (triton,) = [r for r in dev if re.match(r"triton\b", r)]
    bound = re.search(r">=\s*([\d.]+)", triton)
    assert bound is not None and _version(bound.group(1)) >= (3, 7), triton


def test_installed_interpreter_takes_a_tensor_loop_bound():
    triton = pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("checks the interpreter")
    import torch
    import triton.language as tl

    @triton.jit
    def count(X, N):
        n = tl.load(N)
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(X, total)

    out = torch.zeros(1, dtype=torch.int32)
    count[(1,)](out, torch.tensor([3], dtype=torch.int32))
    assert out.item() == 3
