"""No GPU needed: the Triton kernels compile for an H100 (sm_90) with Triton's real compiler and ptxas.

The other kernel tests run under TRITON_INTERPRET=1, which never lowers a kernel; this catches what only the
compiler sees (layouts, dtypes, shared memory, register spills of the fixed block sizes). The checks run in a
subprocess because the interpreter flag is read when Triton is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mmfuse_fast.kernels.compile_check import SHARED_LIMIT, Compiled, problems

pytest.importorskip("triton.backends.nvidia")


def compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_every_kernel_and_autotune_config_compiles_for_sm90():
    out = subprocess.run([sys.executable, "-m", "mmfuse_fast.kernels.compile_check", "--arch", "90", "--quick",
                          "--resources"], capture_output=True, text=True, env=compiler_env(), timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ", 0 problem(s)" in out.stdout
    compiled = {line.split()[0] for line in out.stdout.splitlines() if " compiled, " in line}
    assert compiled == {"_fwd_kernel", "_fwd_static_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                        "_infonce_fwd_kernel", "_infonce_col_repair_kernel", "_infonce_bwd_kernel",
                        "_infonce_bwd_rows_kernel"}


def test_the_harness_reports_what_only_the_compiler_rejects(tmp_path):
    # tl.dot needs M, N, K >= 16 on the GPU; the interpreter multiplies 8 x 8 tiles without complaint
    (tmp_path / "tiny_dot.py").write_text(textwrap.dedent('''
        import torch, triton, triton.language as tl
        from mmfuse_fast.kernels.compile_check import compile_only, problems

        @triton.jit
        def tiny_dot(X, Y, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
            tl.store(Y + offs[:, None] * BLOCK + offs[None, :], tl.dot(x, x))

        with compile_only(90) as records:
            for block in (8, 16):
                x = torch.zeros(block, block, dtype=torch.float16)
                tiny_dot[(1,)](x, torch.empty_like(x), BLOCK=block)
        print("ERRORS", [r.config["BLOCK"] for r in records if r.error])
        print("PROBLEMS", len(problems(records)))
        '''))
    out = subprocess.run([sys.executable, str(tmp_path / "tiny_dot.py")], capture_output=True, text=True,
                         env=compiler_env(), timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERRORS [8]" in out.stdout and "PROBLEMS 1" in out.stdout


def test_problems_rules():
    def record(launch, tuned, shared=0, error=None, resources=None):
        return Compiled("k", 90, launch, tuned, {"BLOCK_M": launch}, shared=shared, error=error,
                        resources=resources or {})

    limit = SHARED_LIMIT[90]
    fine = [record(0, True, shared=limit + 1), record(0, True, shared=limit),  # one tuned config fits: fine
            record(1, False, resources={"reg": 255, "stack": 0})]
    assert problems(fine) == []
    assert len(problems([record(2, True, shared=limit + 1), record(2, True, shared=limit + 8)])) == 1
    assert len(problems([record(3, False, shared=limit + 1)])) == 1
    assert len(problems([record(4, False, resources={"stack": 512})])) == 1  # a fixed launch that spills
    assert problems([record(4, False, resources={"stack": 16})]) == []  # a word or two of stack: tolerated
    assert problems([record(5, True, resources={"stack": 512}), record(5, True)]) == []
    assert "CompilationError" in problems([record(6, False, error="CompilationError: bad")])[0]
