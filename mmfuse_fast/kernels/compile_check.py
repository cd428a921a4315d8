"""Compile every Triton kernel of the package for real GPUs, on a machine that has none.

The CPU test suite runs the kernels under TRITON_INTERPRET=1, which executes their Python semantics but never
runs Triton's GPU compiler. A kernel can pass every interpreter test and still fail to lower (a layout or a dtype
the backend rejects) or need more shared memory than the chip has. This module drives the real launchers with CPU
tensors while a compile-only driver stands in for CUDA: every launch, and every configuration the autotuner could
pick for it, is compiled by Triton's own compiler and ptxas to a cubin for the requested architectures, and its
shared memory is checked against the chip's limit. Nothing is launched and no output is meaningful.

    python -m mmfuse_fast.kernels.compile_check [--arch 90 80] [--quick] [--resources]

Exit status 1 when a kernel fails to compile, when a fixed-configuration launch needs more shared memory than the
chip has or (with --resources) spills registers, or when no configuration of an autotuned launch fits (the
autotuner skips configurations that do not fit, and may well pick one that spills if it is still the fastest).
It must run in a process that imported Triton without TRITON_INTERPRET: the interpreter replaces the compiler
when that variable is set at import.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

# Largest dynamic shared memory per block (bytes) by compute capability: H100/H200 and A100.
SHARED_LIMIT = {90: 232448, 80: 166912}
# Stack bytes per thread still counted as no spill: a few words (a spilled loop bound) cost nothing measurable;
# the spills worth fixing are hundreds of bytes to kilobytes.
SPILL_TOLERANCE_BYTES = 32


@dataclass
class Compiled:
    kernel: str
    arch: int
    launch: int  # index of the launch (one call of a launcher) that asked for this compile
    tuned: bool  # one of an autotuned launch's configurations
    config: dict
    shared: int = 0
    seconds: float = 0.0
    error: str | None = None
    resources: dict = field(default_factory=dict)  # registers / spills from cuobjdump, with --resources
    cubin: bytes | None = field(default=None, repr=False)  # dropped once the resources are read

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared <= SHARED_LIMIT[self.arch]

    @property
    def spills(self) -> bool:
        return self.resources.get("stack", 0) + self.resources.get("local", 0) > SPILL_TOLERANCE_BYTES


class _CompileOnlyDriver:
    """What Triton's JIT asks of the active driver before it compiles; launching is never reached."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


_META = re.compile(r"^[A-Z_0-9]+$|^num_")


@contextlib.contextmanager
def compile_only(arch: int, resources: bool = False) -> Iterator[list[Compiled]]:
    """Within the block, `kernel[grid](...)` compiles for `arch` instead of launching, and an autotuned kernel
    compiles every configuration left after its pruning. Yields the list the compiles are recorded in (with each
    cubin when `resources`)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    records: list[Compiled] = []
    launch = {"index": 0, "tuned": False}
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        config = {k: v for k, v in kwargs.items() if _META.match(k)}
        record = Compiled(self.fn.__name__, arch, launch["index"], launch["tuned"], config)
        start = time.perf_counter()
        try:
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            record.shared = int(kernel.metadata.shared)
            record.cubin = kernel.asm.get("cubin") if resources else None
        except Exception as error:  # a compile failure is the finding, not a reason to stop
            record.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
        record.seconds = time.perf_counter() - start
        records.append(record)
        if not launch["tuned"]:
            launch["index"] += 1

    def tune(self, *args, grid=None, warmup=None, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        launch["tuned"] = True
        try:
            for config in self.prune_configs(kwargs):
                self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
        finally:
            launch["tuned"] = False
            launch["index"] += 1
            self.nargs = None

    previous = driver._active  # reset_active() would try to create a CUDA driver, which fails without a GPU
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run, Autotuner.run = run, tune
    try:
        yield records
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver._active = previous


# --------------------------------------------------------------------------------------------------------------
# the launches to compile: the shapes and dtypes the model and the benchmarks use, and the edge cases of the specs
# --------------------------------------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention_cases(quick: bool) -> list[dict]:
    """(dtype, head dim, set lengths, padding) per case. Sets of >= 128 tokens keep every autotune config; short
    sets keep only the small tiles, as the autotuner's pruning does."""
    cases = [dict(dtype="bf16", head_dim=64, q_sets=(225, 225), kv_sets=(225, 225), used=False),  # the model's CAF
             dict(dtype="fp16", head_dim=32, q_sets=(49, 50), kv_sets=(7, 60), used=True),
             # the A/B variants (module docstring of kernels/modality_attention.py) at the model's visible sets
             dict(dtype="bf16", head_dim=64, q_sets=(56, 56), kv_sets=(56, 56), used=True, lean=True, static=True)]
    if not quick:  # fp32 (3xTF32) is slow to compile: only here
        cases += [dict(dtype=d, head_dim=h, q_sets=(256, 129), kv_sets=(256, 129, 100), used=u)
                  for d in DTYPES for h in (16, 32, 64, 128) for u in ((False, True) if d == "bf16" else (False,))]
        cases += [dict(dtype=d, head_dim=h, q_sets=(225,), kv_sets=(56, 56), used=True, lean=True, static=True)
                  for d in DTYPES for h in (32, 64)]
    return cases


def infonce_cases(quick: bool) -> list[dict]:
    """(dtype, embedding dim, anchors (B, D) or (S, B, D), symmetric, backward with dA atomics) per case."""
    cases = [dict(dtype="bf16", dim=128, anchors_3d=False, symmetric=True, atomic=False),  # the model's loss
             dict(dtype="fp32", dim=100, anchors_3d=True, symmetric=False, atomic=True),
             dict(dtype="fp16", dim=384, anchors_3d=True, symmetric=True, atomic=False),
             dict(dtype="bf16", dim=128, anchors_3d=False, symmetric=True, atomic=False, col_sums="relaxed_staggered"),
             dict(dtype="fp32", dim=256, anchors_3d=False, symmetric=True, atomic=False)]  # `base`: 3xTF32, D chunks
    if not quick:
        variants = [(False, True, False), (True, False, False), (True, True, True), (False, False, True)]
        cases += [dict(dtype=d, dim=dim, anchors_3d=a3, symmetric=sym, atomic=at)
                  for d in DTYPES for dim in (8, 64, 128, 256, 512) for a3, sym, at in variants]
        cases += [dict(dtype=d, dim=dim, anchors_3d=False, symmetric=True, atomic=False, col_sums=col_sums)
                  for d in DTYPES for dim in (128, 256) for col_sums in ("relaxed", "relaxed_staggered")]
    return cases


def _attention_launches(case: dict) -> None:
    from mmfuse_fast.kernels import modality_attention as kernels

    dtype, d = DTYPES[case["dtype"]], case["head_dim"]
    batch, heads = 2, 3
    lq, lk = sum(case["q_sets"]), sum(case["kv_sets"])
    # the model's layout: q, k, v are strided views of one qkv projection
    q = torch.zeros(batch, lq, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4)[0]
    kv = torch.zeros(batch, lk, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4)
    k, v = kv[1], kv[2]
    q_used = torch.tensor([list(case["q_sets"])] * batch, dtype=torch.int32) if case["used"] else None
    kv_used = torch.tensor([list(case["kv_sets"])] * batch, dtype=torch.int32) if case["used"] else None
    allow = ~torch.eye(len(case["q_sets"]), len(case["kv_sets"]), dtype=torch.bool)
    args = (case["q_sets"], case["kv_sets"], allow, q_used, kv_used, d ** -0.5)
    lean = case.get("lean", False)
    out, lse = kernels._forward(q, k, v, *args, lean=lean, static_layout=case.get("static", False))
    kernels._backward(torch.zeros_like(out), q, k, v, out, lse, *args, packed=lean)


def _infonce_launches(case: dict) -> None:
    from mmfuse_fast.kernels import infonce as kernels

    dtype, dim, scales, batch = DTYPES[case["dtype"]], case["dim"], 2, 96
    a = torch.zeros((scales, batch, dim) if case["anchors_3d"] else (batch, dim), dtype=dtype)
    v = torch.zeros(scales, batch, dim, dtype=dtype)
    tau = torch.tensor(0.1)
    ref2 = torch.zeros(scales, batch) if case["symmetric"] else None
    lse = torch.zeros(scales, batch)
    previous = kernels.BWD_DA_ATOMIC, kernels.COL_SUMS
    kernels.BWD_DA_ATOMIC, kernels.COL_SUMS = case["atomic"], case.get("col_sums", "acq_rel")
    try:
        kernels._launch_forward(a, v, tau, ref2, case["symmetric"])
        kernels._launch_backward(a, v, tau, torch.ones(()), lse, lse, 0, 1.0, case["symmetric"])
    finally:
        kernels.BWD_DA_ATOMIC, kernels.COL_SUMS = previous


# --------------------------------------------------------------------------------------------------------------
# checking and reporting
# --------------------------------------------------------------------------------------------------------------


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill stores/loads and stack of a cubin, read by the cuobjdump Triton ships (empty if absent)."""
    from triton.backends.nvidia import compiler as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


def problems(records: list[Compiled]) -> list[str]:
    """Compile errors, fixed launches over the shared-memory limit or spilling, autotuned launches with no config
    that fits."""
    found = [f"{r.kernel} sm_{r.arch} {r.config}: {r.error}" for r in records if r.error]
    found += [f"{r.kernel} sm_{r.arch} {r.config}: spills registers ({r.resources})" for r in records
              if not r.tuned and r.spills]
    by_launch: dict[tuple, list[Compiled]] = {}
    for r in records:
        by_launch.setdefault((r.arch, r.launch, r.kernel), []).append(r)
    for (arch, _, kernel), group in by_launch.items():
        if not any(r.fits for r in group) and not any(r.error for r in group):
            shared = min(r.shared for r in group)
            found.append(f"{kernel} sm_{arch}: needs {shared} B of shared memory, the limit is {SHARED_LIMIT[arch]} B "
                         f"({len(group)} config(s), {group[0].config})")
    return found


def run_checks(archs: list[int], quick: bool, resources: bool = False) -> list[Compiled]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs Triton's compiler: unset TRITON_INTERPRET and use a fresh process")
    records: list[Compiled] = []
    for arch in archs:
        with compile_only(arch, resources) as compiled:
            for case in attention_cases(quick):
                _attention_launches(case)
            for case in infonce_cases(quick):
                _infonce_launches(case)
        records += compiled
    for r in records:
        if r.cubin:
            r.resources, r.cubin = resource_usage(r.cubin), None
    return records


def summary(records: list[Compiled]) -> str:
    lines = []
    for (kernel, arch) in sorted({(r.kernel, r.arch) for r in records}):
        group = [r for r in records if (r.kernel, r.arch) == (kernel, arch)]
        ok = [r for r in group if r.error is None]
        over = [r for r in ok if not r.fits]
        shared = [r.shared for r in ok] or [0]
        line = (f"{kernel:28s} sm_{arch}: {len(ok)}/{len(group)} compiled, shared {min(shared)}-{max(shared)} B, "
                f"{len(over)} over the {SHARED_LIMIT[arch]} B limit")
        spills = [r for r in ok if r.spills]
        if any(r.resources for r in ok):
            line += f", registers <= {max(r.resources.get('reg', 0) for r in ok)}, {len(spills)} spilling"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--quick", action="store_true", help="three cases per kernel family (the test suite's set)")
    parser.add_argument("--resources", action="store_true", help="registers and spills of each cubin (cuobjdump)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    records = run_checks(args.arch, args.quick, args.resources)
    print(summary(records))
    found = problems(records)
    for problem in found:
        print("PROBLEM:", problem)
    print(f"{len(records)} compiles in {time.perf_counter() - start:.0f} s, {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
