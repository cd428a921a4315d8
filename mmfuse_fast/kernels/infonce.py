"""Triton kernels of `multiscale_infonce`: one fused pass for both softmax directions, forward and backward.

Notation (see mmfuse_fast/infonce_math.py for the math): per scale s the logits are L = A Vᵀ / τ with
A = this rank's b anchor rows and V = all B_cols views (the gathered views under a process group; row i's
positive is column `row_offset + i`). Kernels work in log2 units (qk = L · log2 e) and fp32 accumulation; fp32
inputs multiply as 3xTF32 (see `_precision`), fp16/bf16 inputs natively.

Forward, grid (row blocks, S):
    each program keeps its BLOCK_M rows in registers and sweeps all column tiles once. Row LSE: online
    log-sum-exp in registers (exact). Column LSE in the SAME pass: every tile adds Σ_rows exp2(qk − ref_j) to
    col_sum[s, j] with an fp32 atomic, where ref_j is a per-column shift fixed before the launch:
    ref_j = L_jj (the positive logit, from an O(S·B·D) dot product before the launch). The positive term alone is
    then ≈ 1, so the sum never underflows, and it overflows only if a negative logit beats the positive by ≳ 77
    nats (fp32 range minus log B); floating-point sums keep their relative precision at any scale, so the result
    equals an online LSE.
    A repair kernel, grid (column blocks, S), then checks the sums on the device: a column block with a
    non-finite sum recomputes its exact column LSE with an online pass over the rows; clean blocks run zero
    iterations. No host synchronization anywhere. Saved for backward: row LSE (S, b) and column LSE (S, B_cols).
Backward (no B x B storage; G = softmax_row + symmetric·softmax_col − (1 + symmetric)·I, unscaled in [−2, 1],
recomputed from qk and the saved LSEs):
    dV: grid (column blocks, S, output-D chunks); each program keeps BLOCK_N view rows and their dV accumulator in
    registers and sweeps the row tiles: dV_J += Gᵀ A_I.
    dA: by default a second, row-major pass, grid (row blocks, S, output-D chunks): dA_I += G V_J in registers
    (no atomics, deterministic). With BWD_DA_ATOMIC = True the column pass also adds G V_J into dA with fp32
    atomics instead (one recomputation fewer, BLOCK_M·D atomics per tile).
    dτ = −(1/τ) Σ A · dA afterwards (an exact identity: O(S·B·D) work, no extra reduction in the kernels).

A/B switches (module attributes, read at every launch; the first value is the default, numbers equal up to the
order of floating-point sums):
    COL_SUMS = "acq_rel" | "relaxed" | "relaxed_staggered"   (environment: MMFUSE_INFONCE_COL_SUMS)
        the forward's column-sum atomics with Triton's default ordering; with relaxed ordering; relaxed and each
        row block starting its column sweep at its own tile, so concurrent programs add into different columns.
    BWD_DA_ATOMIC = False | True
        backward: a second, row-major pass for dA; one pass with dA through fp32 atomics.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from mmfuse_fast.infonce_math import (
    all_gather_nograd,
    assemble_loss,
    finish_grads,
    function_args,
    loss_scale,
    merge_partial_lse,
    temperature_tensor,
    without_autocast,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
REF_MARGIN = 0.0  # natural-log units above the positive logit (see the module docstring)

# Largest head dimension handled with one register tile per operand; above it the kernels loop over D chunks.
MAX_SINGLE_D = 256
# Backward strategy. False (default): a column-major pass for dV and a row-major pass for dA, each recomputing the
# logits; no atomics, deterministic. True: one pass, dA through fp32 atomics (fewer FLOPs, many more atomics:
# BLOCK_M x D per tile). Which is faster on a given GPU is for bench_infonce.py to say.
BWD_DA_ATOMIC = False
# Forward column sums (A/B switch, read at every launch): the atomics' memory ordering and whether row blocks
# sweep the column tiles from staggered starting points. "acq_rel" (Triton's default ordering) is the default.
COL_SUMS_VARIANTS = {"acq_rel": dict(ATOMIC_SEM="acq_rel", STAGGER=False),
                     "relaxed": dict(ATOMIC_SEM="relaxed", STAGGER=False),
                     "relaxed_staggered": dict(ATOMIC_SEM="relaxed", STAGGER=True)}
COL_SUMS = os.environ.get("MMFUSE_INFONCE_COL_SUMS", "acq_rel")


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _qk_tile(a_ptrs_base, v_ptrs_base, row_ok, col_ok, dim, a_single, v_single,
             SINGLE_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             PRECISION: tl.constexpr):
    """A_I V_Jᵀ in fp32. a_ptrs_base: (BLOCK_M, 1) row pointers; v_ptrs_base: (BLOCK_N, 1) row pointers."""
    if SINGLE_D:
        acc = tl.dot(a_single, tl.trans(v_single), input_precision=PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, dim, BLOCK_D):
            d_ok = (d0 + offs_d) < dim
            a = tl.load(a_ptrs_base + d0 + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs_base + d0 + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(v), input_precision=PRECISION)
    return acc


@triton.jit
def _infonce_fwd_kernel(
    A, V, TAU, REF, ROW_LSE, COL_SUM,
    n_rows, n_cols, dim,
    stride_as, stride_ab, stride_vs, stride_vb,
    SYMMETRIC: tl.constexpr, SINGLE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_SEM: tl.constexpr = "acq_rel", STAGGER: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    qk_scale = 1.4426950408889634 / tl.load(TAU)
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    # STAGGER: neighbouring row blocks start their sweep on neighbouring column tiles, so the programs in flight add
    # into different columns instead of all contending for the same atomics.
    first_tile = pid_m % tl.maximum(n_tiles, 1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = A + s * stride_as + rows[:, None] * stride_ab
    v_base = V + s * stride_vs
    if SINGLE_D:
        a_single = tl.load(a_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
    else:
        a_single = 0.0

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(0, n_tiles):
        if STAGGER:
            tile = t + first_tile
            tile = tl.where(tile >= n_tiles, tile - n_tiles, tile)
        else:
            tile = t
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        v_rows = v_base + cols[:, None] * stride_vb
        if SINGLE_D:
            v_single = tl.load(v_rows + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
        else:
            v_single = 0.0
        qk = _qk_tile(a_rows, v_rows, row_ok, col_ok, dim, a_single, v_single,
                      SINGLE_D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION) * qk_scale
        # row direction: online log-sum-exp
        qk_row = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk_row, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk_row - m_new[:, None]), 1)
        m_i = m_new
        # column direction: fixed per-column shift, partial sums combined with atomics
        if SYMMETRIC:
            ref = tl.load(REF + s * n_cols + cols, mask=col_ok, other=0.0)
            p = tl.where(row_ok[:, None], tl.math.exp2(qk - ref[None, :]), 0.0)
            # the sums are read only by the next kernel: no ordering with other memory is needed ("relaxed")
            tl.atomic_add(COL_SUM + s * n_cols + cols, tl.sum(p, 0), mask=col_ok, sem=ATOMIC_SEM)
    tl.store(ROW_LSE + s * n_rows + rows, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _infonce_col_repair_kernel(
    A, V, TAU, COL_M, COL_L,
    n_rows, n_cols, dim,
    stride_as, stride_ab, stride_vs, stride_vb,
    SINGLE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Columns whose shifted sum overflowed get their exact (max, sum) from an online pass; others: 0 iterations."""
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    qk_scale = 1.4426950408889634 / tl.load(TAU)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    ref = tl.load(COL_M + s * n_cols + cols, mask=col_ok, other=0.0)
    col_sum = tl.load(COL_L + s * n_cols + cols, mask=col_ok, other=1.0)
    bad = col_ok & ((col_sum != col_sum) | (col_sum == float("inf")))
    n_iter = tl.max(bad.to(tl.int32), 0) * tl.cdiv(n_rows, BLOCK_M)

    offs_d = tl.arange(0, BLOCK_D)
    v_rows = V + s * stride_vs + cols[:, None] * stride_vb
    if SINGLE_D:
        v_single = tl.load(v_rows + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
    else:
        v_single = 0.0
    m_j = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l_j = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for it in range(0, n_iter):
        rows = it * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        a_rows = A + s * stride_as + rows[:, None] * stride_ab
        if SINGLE_D:
            a_single = tl.load(a_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
        else:
            a_single = 0.0
        qk = _qk_tile(a_rows, v_rows, row_ok, col_ok, dim, a_single, v_single,
                      SINGLE_D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION) * qk_scale
        qk = tl.where(row_ok[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_j, tl.max(qk, 0))
        l_j = l_j * tl.math.exp2(m_j - m_new) + tl.sum(tl.math.exp2(qk - m_new[None, :]), 0)
        m_j = m_new
    tl.store(COL_M + s * n_cols + cols, tl.where(bad, m_j, ref), mask=col_ok)
    tl.store(COL_L + s * n_cols + cols, tl.where(bad, l_j, col_sum), mask=col_ok)


@triton.jit
def _infonce_bwd_kernel(
    A, V, TAU, GRAD_OUT, ROW_LSE, COL_LSE, DA, DV,
    n_rows, n_cols, dim, row_offset, coef,
    stride_as, stride_ab, stride_vs, stride_vb, stride_das, stride_dab, stride_dvs, stride_dvb,
    SYMMETRIC: tl.constexpr, SINGLE_D: tl.constexpr, DA_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dV for one column block (registers); with DA_ATOMIC also dA, through fp32 atomics."""
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    pid_d = tl.program_id(2)
    inv_t = 1.0 / tl.load(TAU)
    qk_scale = inv_t * 1.4426950408889634
    scale = tl.load(GRAD_OUT).to(tl.float32) * coef * inv_t

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < dim
    v_rows = V + s * stride_vs + cols[:, None] * stride_vb
    if SINGLE_D:
        v_single = tl.load(v_rows + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
        v_out = v_single
    else:
        v_single = 0.0
        v_out = tl.load(v_rows + offs_do[None, :], mask=col_ok[:, None] & do_ok[None, :], other=0.0)
    if SYMMETRIC:
        col_lse = tl.load(COL_LSE + s * n_cols + cols, mask=col_ok, other=float("inf"))
    n_pos = 2.0 if SYMMETRIC else 1.0

    dv = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        a_rows = A + s * stride_as + rows[:, None] * stride_ab
        if SINGLE_D:
            a_single = tl.load(a_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
            a_out = a_single
        else:
            a_single = 0.0
            a_out = tl.load(a_rows + offs_do[None, :], mask=row_ok[:, None] & do_ok[None, :], other=0.0)
        qk = _qk_tile(a_rows, v_rows, row_ok, col_ok, dim, a_single, v_single,
                      SINGLE_D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION) * qk_scale
        row_lse = tl.load(ROW_LSE + s * n_rows + rows, mask=row_ok, other=float("inf"))
        g = tl.math.exp2(qk - row_lse[:, None])
        if SYMMETRIC:
            g += tl.math.exp2(qk - col_lse[None, :])
        g = tl.where((rows[:, None] + row_offset) == cols[None, :], g - n_pos, g)
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        g_lp = g.to(a_out.dtype)
        dv += tl.dot(tl.trans(g_lp), a_out, input_precision=PRECISION)
        if DA_ATOMIC:
            da = tl.dot(g_lp, v_out, input_precision=PRECISION) * scale
            tl.atomic_add(DA + s * stride_das + rows[:, None] * stride_dab + offs_do[None, :], da,
                          mask=row_ok[:, None] & do_ok[None, :])
    dv_ptrs = DV + s * stride_dvs + cols[:, None] * stride_dvb + offs_do[None, :]
    tl.store(dv_ptrs, (dv * scale).to(DV.dtype.element_ty), mask=col_ok[:, None] & do_ok[None, :])



@triton.jit
def _infonce_bwd_rows_kernel(
    A, V, TAU, GRAD_OUT, ROW_LSE, COL_LSE, DA,
    n_rows, n_cols, dim, row_offset, coef,
    stride_as, stride_ab, stride_vs, stride_vb, stride_das, stride_dab,
    SYMMETRIC: tl.constexpr, SINGLE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dA for one row block, accumulated in registers over all column tiles (no atomics, deterministic)."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    pid_d = tl.program_id(2)
    inv_t = 1.0 / tl.load(TAU)
    qk_scale = inv_t * 1.4426950408889634
    scale = tl.load(GRAD_OUT).to(tl.float32) * coef * inv_t

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < dim
    a_rows = A + s * stride_as + rows[:, None] * stride_ab
    if SINGLE_D:
        a_single = tl.load(a_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
    else:
        a_single = 0.0
    row_lse = tl.load(ROW_LSE + s * n_rows + rows, mask=row_ok, other=float("inf"))
    n_pos = 2.0 if SYMMETRIC else 1.0

    da = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for n0 in range(0, n_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        v_rows = V + s * stride_vs + cols[:, None] * stride_vb
        if SINGLE_D:
            v_single = tl.load(v_rows + offs_d[None, :], mask=col_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
            v_out = v_single
        else:
            v_single = 0.0
            v_out = tl.load(v_rows + offs_do[None, :], mask=col_ok[:, None] & do_ok[None, :], other=0.0)
        qk = _qk_tile(a_rows, v_rows, row_ok, col_ok, dim, a_single, v_single,
                      SINGLE_D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION) * qk_scale
        g = tl.math.exp2(qk - row_lse[:, None])
        if SYMMETRIC:
            col_lse = tl.load(COL_LSE + s * n_cols + cols, mask=col_ok, other=float("inf"))
            g += tl.math.exp2(qk - col_lse[None, :])
        g = tl.where((rows[:, None] + row_offset) == cols[None, :], g - n_pos, g)
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        da += tl.dot(g.to(v_out.dtype), v_out, input_precision=PRECISION)
    da_ptrs = DA + s * stride_das + rows[:, None] * stride_dab + offs_do[None, :]
    tl.store(da_ptrs, da * scale, mask=row_ok[:, None] & do_ok[None, :])


# --------------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    """The products' precision. fp32 inputs (the model's embeddings): 3xTF32 on the tensor cores, which keeps about
    fp32 accuracy, or plain TF32 where torch allows TF32 matmuls (as the reference would then use). Not "ieee": its
    FMA lowering spills kilobytes of registers per thread at every tile size tried (`compile_check --resources`).
    The interpreter computes in fp32 whatever the setting."""
    if dtype != torch.float32:
        return "tf32"  # Triton's default; irrelevant for fp16/bf16 operands
    if _interpreted():
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


# 3xTF32 splits every operand into two TF32 halves: twice the registers. Tiles without spills on sm_90 (checked by
# `python -m mmfuse_fast.kernels.compile_check --resources`); wider D loops over 64-wide chunks.
_TF32X3_MAX_SINGLE_D = 128
_TF32X3_CONFIGS = {"fwd": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
                   "repair": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
                   "bwd": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
                   "bwd_atomic": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
                   "bwd_rows": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)}


def _config(dim: int, kind: str, precision: str = "tf32") -> dict:
    """Block sizes: first guesses for an H100 that compile without register spills, not yet timed (no autotuning:
    atomics would accumulate over the autotuner's repeated launches)."""
    single = dim <= (_TF32X3_MAX_SINGLE_D if precision == "tf32x3" else MAX_SINGLE_D)
    block_d = max(16, triton.next_power_of_2(dim)) if single else 64
    if _interpreted():
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    elif precision == "tf32x3":
        cfg = dict(_TF32X3_CONFIGS["bwd_atomic" if kind == "bwd" and BWD_DA_ATOMIC else kind])
    elif kind == "fwd":
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3) if block_d <= 128 else \
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    elif kind == "repair":
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    elif kind == "bwd_rows":
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2) if block_d <= 128 else \
            dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2) if block_d <= 128 else \
            dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)
    cfg.update(SINGLE_D=single, BLOCK_D=block_d)
    if kind in ("bwd", "bwd_rows"):
        cfg["BLOCK_DO"] = block_d if single else (64 if precision == "tf32x3" else 128)
    return cfg


def col_sum_variant() -> dict:
    """The forward's column-sum launch options selected by `COL_SUMS` (see the module docstring)."""
    if COL_SUMS not in COL_SUMS_VARIANTS:
        raise ValueError(f"mmfuse_fast.kernels.infonce.COL_SUMS (env MMFUSE_INFONCE_COL_SUMS) is {COL_SUMS!r}; "
                         f"expected one of {', '.join(COL_SUMS_VARIANTS)}")
    return dict(COL_SUMS_VARIANTS[COL_SUMS])


def _launch_forward(a, v, tau, ref2, symmetric):
    """(row LSE, per-column shift, per-column sums relative to that shift), in log2 units; the last two are None
    when not symmetric. The shift starts as a copy of `ref2` (never written: the repair kernel rewrites the copy
    for the columns it recomputes)."""
    n_scales, n_cols, dim = v.shape
    n_rows = a.shape[-2]
    stride_as = 0 if a.dim() == 2 else a.stride(0)
    row_lse2 = torch.empty(n_scales, n_rows, device=v.device, dtype=torch.float32)
    col_sum = torch.zeros(n_scales, n_cols, device=v.device, dtype=torch.float32) if symmetric else row_lse2
    col_ref2 = ref2.clone() if symmetric else row_lse2
    precision = _precision(v.dtype)
    cfg = _config(dim, "fwd", precision)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), n_scales)
    _infonce_fwd_kernel[grid](
        a, v, tau, col_ref2, row_lse2, col_sum, n_rows, n_cols, dim,
        stride_as, a.stride(-2), v.stride(0), v.stride(1),
        SYMMETRIC=symmetric, PRECISION=precision, **col_sum_variant(), **cfg)
    if not symmetric:
        return row_lse2, None, None
    cfg = _config(dim, "repair", precision)
    grid = (triton.cdiv(n_cols, cfg["BLOCK_N"]), n_scales)
    _infonce_col_repair_kernel[grid](
        a, v, tau, col_ref2, col_sum, n_rows, n_cols, dim,
        stride_as, a.stride(-2), v.stride(0), v.stride(1),
        PRECISION=precision, **cfg)
    return row_lse2, col_ref2, col_sum


def _launch_backward(a, v, tau, grad_out, row_lse2, col_lse2, row_offset, coef, symmetric):
    n_scales, n_cols, dim = v.shape
    n_rows = a.shape[-2]
    stride_as = 0 if a.dim() == 2 else a.stride(0)
    col_lse_arg = col_lse2 if symmetric else row_lse2
    precision = _precision(v.dtype)
    d_v = torch.empty_like(v)
    if BWD_DA_ATOMIC:  # one pass over the tiles; dA through atomics (2-D anchors: atomics also sum over scales)
        d_a = torch.zeros(a.shape, device=v.device, dtype=torch.float32)
        stride_das = 0 if a.dim() == 2 else d_a.stride(0)
    else:  # dA from a second, row-major pass: no atomics, deterministic; 2-D anchors: per-scale rows summed after
        d_a = torch.empty(n_scales, n_rows, dim, device=v.device, dtype=torch.float32)
        stride_das = d_a.stride(0)
    cfg = _config(dim, "bwd", precision)
    grid = (triton.cdiv(n_cols, cfg["BLOCK_N"]), n_scales, triton.cdiv(dim, cfg["BLOCK_DO"]))
    _infonce_bwd_kernel[grid](
        a, v, tau, grad_out, row_lse2, col_lse_arg, d_a, d_v,
        n_rows, n_cols, dim, row_offset, coef,
        stride_as, a.stride(-2), v.stride(0), v.stride(1), stride_das, d_a.stride(-2), d_v.stride(0), d_v.stride(1),
        SYMMETRIC=symmetric, DA_ATOMIC=BWD_DA_ATOMIC, PRECISION=precision, **cfg)
    if not BWD_DA_ATOMIC:
        cfg = _config(dim, "bwd_rows", precision)
        grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), n_scales, triton.cdiv(dim, cfg["BLOCK_DO"]))
        _infonce_bwd_rows_kernel[grid](
            a, v, tau, grad_out, row_lse2, col_lse_arg, d_a,
            n_rows, n_cols, dim, row_offset, coef,
            stride_as, a.stride(-2), v.stride(0), v.stride(1), d_a.stride(0), d_a.stride(1),
            SYMMETRIC=symmetric, PRECISION=precision, **cfg)
        if a.dim() == 2:
            d_a = d_a.sum(0)
    return d_a, d_v


# --------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------


# The launchers as custom ops: torch.compile traces them through their fakes instead of into the launch code.


@torch.library.custom_op("mmfuse::infonce_fwd", mutates_args=())
def infonce_fwd(a: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, ref2: Optional[torch.Tensor],
                symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row LSE (S, b), column shift (S, B_cols): `ref2` where the shifted sums stayed finite, else the column's
    exact max, column sums relative to that shift (S, B_cols)), log2 units; the last two empty when not symmetric.
    `ref2` itself is left as it was."""
    row_lse2, col_ref2, col_sum = _launch_forward(a, v, tau, ref2, symmetric)
    if not symmetric:
        return row_lse2, row_lse2.new_empty(0), row_lse2.new_empty(0)
    return row_lse2, col_ref2, col_sum


@infonce_fwd.register_fake
def _(a, v, tau, ref2, symmetric):
    n_scales, n_cols, _ = v.shape
    col_shape = (n_scales, n_cols) if symmetric else (0,)
    return (v.new_empty((n_scales, a.shape[-2]), dtype=torch.float32),
            v.new_empty(col_shape, dtype=torch.float32), v.new_empty(col_shape, dtype=torch.float32))


@torch.library.custom_op("mmfuse::infonce_bwd", mutates_args=())
def infonce_bwd(a: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, grad_out: torch.Tensor, row_lse2: torch.Tensor,
                col_lse2: torch.Tensor, row_offset: int, coef: float,
                symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA in fp32, shaped like `a`; dV in v's dtype)."""
    return _launch_backward(a, v, tau, grad_out, row_lse2, col_lse2, row_offset, coef, symmetric)


@infonce_bwd.register_fake
def _(a, v, tau, grad_out, row_lse2, col_lse2, row_offset, coef, symmetric):
    return a.new_empty(a.shape, dtype=torch.float32), torch.empty_like(v)


class _TritonInfoNCE(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, anchors, cols, temperature, temp_value, symmetric, row_offset, n_global, group):
        dtype = torch.promote_types(anchors.dtype, cols.dtype)
        a = anchors.to(dtype).contiguous()
        v = cols.to(dtype).contiguous()
        n_scales, n_cols, _ = v.shape
        b = a.shape[-2]
        tau = temperature_tensor(temperature if temperature is not None else temp_value, v.device)
        a3 = a.float().expand(n_scales, -1, -1) if a.dim() == 2 else a.float()
        pos = torch.einsum("sbd,sbd->sb", a3, v[:, row_offset:row_offset + b].float()) / tau  # (S, b), natural
        del a3

        ref2 = None
        if symmetric:
            pos_all = all_gather_nograd(pos, group, 1) if group is not None else pos
            ref2 = ((pos_all + REF_MARGIN) * LOG2E).contiguous()
        row_lse2, col_ref2, col_sum = torch.ops.mmfuse.infonce_fwd(a, v, tau, ref2, symmetric)
        col_lse2 = row_lse2  # placeholder saved when not symmetric
        if symmetric:
            col_lse2 = merge_partial_lse(col_ref2 + torch.log2(col_sum), group, base2=True).contiguous()
        loss = assemble_loss(row_lse2 * LN2, col_lse2 * LN2 if symmetric else None, pos, symmetric, row_offset,
                             n_global, group)

        ctx.save_for_backward(a, v, tau, row_lse2, col_lse2)
        ctx.symmetric, ctx.row_offset, ctx.n_global = symmetric, row_offset, n_global
        ctx.tau_needs_grad = temperature is not None and ctx.needs_input_grad[2]
        if temperature is not None:
            ctx.tau_device, ctx.tau_dtype = temperature.device, temperature.dtype
        ctx.anchors_dtype, ctx.views_dtype = anchors.dtype, cols.dtype
        return loss

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        a, v, tau, row_lse2, col_lse2 = ctx.saved_tensors
        n_scales = v.shape[0]
        coef = loss_scale(n_scales, ctx.n_global, ctx.symmetric)
        grad_out = grad_out.to(torch.float32).contiguous()
        d_a, d_v = torch.ops.mmfuse.infonce_bwd(a, v, tau, grad_out, row_lse2, col_lse2, ctx.row_offset, coef,
                                                     ctx.symmetric)
        d_anchors, d_cols, d_tau = finish_grads(ctx, d_a, d_v, a.float() if ctx.tau_needs_grad else a, 1.0 / tau,
                                                ctx.tau_needs_grad)
        return d_anchors, d_cols, d_tau, None, None, None, None, None


def multiscale_infonce_triton(anchors, views, temperature=0.1, symmetric=True, group=None) -> torch.Tensor:
    """`multiscale_infonce` through the fused Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    return _TritonInfoNCE.apply(*function_args(anchors, views, temperature, symmetric, group))
