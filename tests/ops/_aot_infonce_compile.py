"""Compiles the multiscale_infonce Triton kernels ahead of time for an H100 (sm_90), without a GPU.

Run by tests/ops/test_infonce.py in a subprocess (TRITON_INTERPRET must be unset for triton.jit to build real
kernels). Prints one line per kernel with its registers and spill stack (cuobjdump), exits non-zero on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from mmfuse_fast.kernels import infonce as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = {"fwd": K._infonce_fwd_kernel, "repair": K._infonce_col_repair_kernel, "bwd": K._infonce_bwd_kernel,
           "bwd_rows": K._infonce_bwd_rows_kernel}


def compile_one(kind: str, dtype: str, dim: int, symmetric: bool = True, atomic: bool = False):
    fn = KERNELS[kind]
    cfg = K._config(dim, kind)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        if name in cfg:
            constexprs[name], signature[name] = cfg[name], "constexpr"
        elif name in ("SYMMETRIC", "DA_ATOMIC", "PRECISION"):
            constexprs[name] = {"SYMMETRIC": symmetric, "DA_ATOMIC": atomic, "PRECISION": "tf32"}[name]
            signature[name] = "constexpr"
        elif name in ("A", "V", "DV"):
            signature[name] = "*" + dtype
        elif name == "coef":
            signature[name] = "fp32"
        elif name.isupper():
            signature[name] = "*fp32"
        else:
            signature[name] = "i32"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    usage = ""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" in kernel.asm and os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
            fh.write(kernel.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", fh.name], capture_output=True, text=True)
        os.unlink(fh.name)
        usage = " ".join(w for w in out.stdout.split() if w.startswith(("REG:", "STACK:")))
    print(f"{kind} {dtype} D={dim} sym={symmetric} atomic={atomic}: ok {usage}", flush=True)
    return usage


def main() -> None:
    spilled = []
    configs = [(kind, "bf16", 128) for kind in KERNELS] + [(kind, "fp16", 384) for kind in KERNELS] + \
        [("fwd", "fp32", 256), ("bwd_rows", "bf16", 256)]
    for kind, dtype, dim in configs:
        if "STACK:" in (usage := compile_one(kind, dtype, dim)) and "STACK:0" not in usage:
            spilled.append(f"{kind} {dtype} D={dim}: {usage}")
    compile_one("bwd", "fp16", 128, symmetric=False, atomic=True)
    if spilled:
        sys.exit("register spills: " + "; ".join(spilled))


if __name__ == "__main__":
    main()
