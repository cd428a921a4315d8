"""Triton kernels of `modality_attention`: fused attention across modality token sets (contract: docs/architecture.md,
"Ops and kernels").

One launch covers every (batch, head, query block) of every query set. Query blocks never straddle set
boundaries, so each program has exactly one query set; it walks only the key blocks of the sets that
`allow[set, :]` permits, and only their used prefix (`kv_used`, read on the device), so disallowed sets and
padding cost nothing. Online softmax in fp32 with exp2, fp32 accumulation.

Backward (flash-attention 2 style, no atomics): a preprocess kernel computes delta = rowsum(o * do); a dk/dv
kernel gives each key block its set j and walks the query blocks of the sets i with allow[i, j] (allow
transposed); a dq kernel walks the same key blocks as the forward. Probabilities are recomputed from the saved
row log-sum-exp.

Saved statistic: `lse` (fp32, (B, H, Lq)) is the base-2 log-sum-exp of the scaled scores, i.e.
lse = log2(sum_j exp2(s_j * scale * log2(e))); rows with no allowed, used key and padding queries store +inf,
so that exp2(s - lse) is exactly 0 there and their gradients (and contributions to dk, dv) are exact zeros.

Set offsets are static Python ints; they go to the device once as small int32 tables cached per device (the
first call must happen outside CUDA-graph capture, which the autotuner needs anyway). Everything else is read on
the device: no host synchronization, CUDA-graph safe.

The public entry point is `modality_attention_triton`; it runs `torch.ops.mmfuse.modality_attention_fwd`,
a `torch.library` custom op with a fake implementation and a registered autograd formula (backward:
`torch.ops.mmfuse.modality_attention_bwd`), so `torch.compile` traces through it without graph breaks.

fp32 inputs multiply as 3xTF32 on the tensor cores (about fp32 accuracy; plain TF32 where torch allows TF32
matmuls), with the autotuner's tiles limited to those that do not spill registers (head dims up to 64; wider
heads still spill a little with the one tile kept).

A/B switches (module attributes, read at every call; the first value is the default; every variant gives the
same numbers):
    WRAPPER = "default" | "lean"          (environment: MMFUSE_ATTN_WRAPPER)
        lean: set offsets, launch constants and the all-allowed table looked up once per set layout (a bool
        `allow` is read by the kernels as it is); the output stored as (B, Lq, H, D), the layout the block's
        output projection reads (merging the heads is a view, not a copy); no zeros tensor materialized for the
        unused `lse` gradient (`set_materialize_grads(False)`); dq, dk, dv written into one buffer.
    KERNEL = "default" | "static"         (environment: MMFUSE_ATTN_KERNEL)
        static: the forward compiled for the set layout (offsets as compile-time constants, one autotuning per
        layout) with one loop over all key blocks of all sets, each skipped unless allowed and used; the
        backward kernels are shared.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256

# Block sizes used when the kernels run under the Triton interpreter (CPU), or when a test forces them:
# {"fwd": (BLOCK_M, BLOCK_N), "dkdv": (BLOCK_M, BLOCK_N), "dq": (BLOCK_M, BLOCK_N)}. None on a GPU = autotune.
INTERPRET_BLOCKS = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}
FORCE_BLOCKS: dict | None = None

# A/B switches (module docstring); read at every call, the first value is the default.
WRAPPERS = ("default", "lean")
KERNELS = ("default", "static")
WRAPPER = os.environ.get("MMFUSE_ATTN_WRAPPER", "default")
KERNEL = os.environ.get("MMFUSE_ATTN_KERNEL", "default")


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _block_of(pid, OFF, NSEG: tl.constexpr, BLOCK: tl.constexpr):
    """Block id -> (set, set start, block start, set end); blocks are numbered set after set, none straddles."""
    seg = pid * 0
    seg_start = pid * 0
    blk_start = pid * 0
    seg_end = pid * 0
    first = pid * 0
    for i in tl.static_range(NSEG):
        s = tl.load(OFF + i)
        e = tl.load(OFF + i + 1)
        nb = (e - s + BLOCK - 1) // BLOCK
        hit = (pid >= first) & (pid < first + nb)
        seg = tl.where(hit, i, seg)
        seg_start = tl.where(hit, s, seg_start)
        blk_start = tl.where(hit, s + (pid - first) * BLOCK, blk_start)
        seg_end = tl.where(hit, e, seg_end)
        first += nb
    return seg, seg_start, blk_start, seg_end


@triton.jit
def _used_end(USED, b, seg, stride_b, stride_s, seg_start, seg_end, HAS_USED: tl.constexpr):
    """End of the used prefix of set `seg` for sample b (capacity when there is no `used` tensor)."""
    if HAS_USED:
        n = tl.load(USED + b * stride_b + seg * stride_s).to(tl.int32)
        n = tl.minimum(tl.maximum(n, 0), seg_end - seg_start)
        return seg_start + n
    else:
        return seg_end


@triton.jit
def _attend_key_block(q, k_base, v_base, offs_n, key_end, offs_d, d_ok, s_kn, s_kd, s_vn, s_vd, qk_scale, m_i, l_i,
                      acc, PREC: tl.constexpr):
    """One online-softmax step of the forward over the keys `offs_n` (those at or past `key_end` masked)."""
    col_ok = offs_n < key_end
    kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    s = tl.dot(q, kt, input_precision=PREC) * qk_scale
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _store_forward(O, LSE, acc, m_i, l_i, row_ok, offs_m, offs_d, d_ok, seg_end, b, h, H, Lq,
                   s_ob, s_oh, s_om, s_od):
    """Normalized output and base-2 LSE of a query block; rows without a key: zeros and +inf."""
    has_key = (l_i > 0.0) & row_ok
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_key, m_i + tl.math.log2(l_safe), float("inf"))
    in_set = offs_m < seg_end
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=in_set[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=in_set)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, QOFF, KOFF, ALLOW, QUSED, KUSED,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_qub, s_qus, s_kub, s_kus,
    H, Lq, qk_scale, TUNE_LQ, TUNE_LK,
    NQ: tl.constexpr, NK: tl.constexpr, HAS_QU: tl.constexpr, HAS_KU: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seg, seg_start, m0, seg_end = _block_of(pid_m, QOFF, NQ, BLOCK_M)
    q_end = _used_end(QUSED, b, seg, s_qub, s_qus, seg_start, seg_end, HAS_QU)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_end
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    live = m0 < q_end  # a block made only of padding queries walks no key
    for j in range(NK):
        ok = (tl.load(ALLOW + seg * NK + j) != 0) & live
        ks = tl.load(KOFF + j)
        ke = _used_end(KUSED, b, j, s_kub, s_kus, ks, tl.load(KOFF + j + 1), HAS_KU)
        ke = tl.where(ok, ke, ks)
        for n0 in range(ks, ke, BLOCK_N):
            m_i, l_i, acc = _attend_key_block(q, k_base, v_base, n0 + offs_n0, ke, offs_d, d_ok, s_kn, s_kd, s_vn,
                                              s_vd, qk_scale, m_i, l_i, acc, PREC)
    _store_forward(O, LSE, acc, m_i, l_i, row_ok, offs_m, offs_d, d_ok, seg_end, b, h, H, Lq, s_ob, s_oh, s_om, s_od)


@triton.jit
def _static_block_of(pid, OFFS: tl.constexpr, NSEG: tl.constexpr, BLOCK: tl.constexpr):
    """`_block_of` with the set offsets as compile-time constants: no loads, the comparisons fold."""
    seg = pid * 0
    seg_start = pid * 0
    blk_start = pid * 0
    seg_end = pid * 0
    first = 0
    for i in tl.static_range(NSEG):
        nb = (OFFS[i + 1] - OFFS[i] + BLOCK - 1) // BLOCK
        hit = (pid >= first) & (pid < first + nb)
        seg = tl.where(hit, i, seg)
        seg_start = tl.where(hit, OFFS[i], seg_start)
        blk_start = tl.where(hit, OFFS[i] + (pid - first) * BLOCK, blk_start)
        seg_end = tl.where(hit, OFFS[i + 1], seg_end)
        first += nb
    return seg, seg_start, blk_start, seg_end


@triton.jit
def _fwd_static_kernel(
    Q, K, V, O, LSE, ALLOW, QUSED, KUSED,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_qub, s_qus, s_kub, s_kus,
    H, Lq, qk_scale, TUNE_LQ, TUNE_LK,
    Q_OFFS: tl.constexpr, K_OFFS: tl.constexpr,
    NQ: tl.constexpr, NK: tl.constexpr, HAS_QU: tl.constexpr, HAS_KU: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The forward with the set layout compiled in: one loop over every key block of every set (a trip count
    known at compile time), each block skipped unless its set is allowed and it holds a used key."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seg, seg_start, m0, seg_end = _static_block_of(pid_m, Q_OFFS, NQ, BLOCK_M)
    q_end = _used_end(QUSED, b, seg, s_qub, s_qus, seg_start, seg_end, HAS_QU)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_end
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    live = m0 < q_end
    n_key_blocks = 0
    for j in tl.static_range(NK):
        n_key_blocks += (K_OFFS[j + 1] - K_OFFS[j] + BLOCK_N - 1) // BLOCK_N
    for kb in range(n_key_blocks):
        kseg, ks, n0, ke = _static_block_of(kb, K_OFFS, NK, BLOCK_N)
        ke = _used_end(KUSED, b, kseg, s_kub, s_kus, ks, ke, HAS_KU)
        if live & (n0 < ke) & (tl.load(ALLOW + seg * NK + kseg) != 0):
            m_i, l_i, acc = _attend_key_block(q, k_base, v_base, n0 + offs_n0, ke, offs_d, d_ok, s_kn, s_kd, s_vn,
                                              s_vd, qk_scale, m_i, l_i, acc, PREC)
    _store_forward(O, LSE, acc, m_i, l_i, row_ok, offs_m, offs_d, d_ok, seg_end, b, h, H, Lq, s_ob, s_oh, s_om, s_od)


@triton.jit
def _bwd_preprocess(
    O, DO, DELTA,
    s_ob, s_oh, s_om, s_od,
    s_dob, s_doh, s_dom, s_dod,
    H, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QOFF, KOFF, ALLOW, QUSED, KUSED,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_dob, s_doh, s_dom, s_dod,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_qub, s_qus, s_kub, s_kus,
    H, Lq, qk_scale, sm_scale, TUNE_LQ, TUNE_LK,
    NQ: tl.constexpr, NK: tl.constexpr, HAS_QU: tl.constexpr, HAS_KU: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seg, seg_start, n0, seg_end = _block_of(pid_n, KOFF, NK, BLOCK_N)
    k_end = _used_end(KUSED, b, seg, s_kub, s_kus, seg_start, seg_end, HAS_KU)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < k_end
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_dob + h * s_doh
    row_base = (b * H + h) * Lq

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    live = n0 < k_end
    for i in range(NQ):
        ok = (tl.load(ALLOW + i * NK + seg) != 0) & live
        qs = tl.load(QOFF + i)
        qe = _used_end(QUSED, b, i, s_qub, s_qus, qs, tl.load(QOFF + i + 1), HAS_QU)
        qe = tl.where(ok, qe, qs)
        for m0 in range(qs, qe, BLOCK_M):
            offs_m = m0 + offs_m0
            row_ok = offs_m < qe
            qt = tl.load(q_base + offs_m[None, :] * s_qm + offs_d[:, None] * s_qd,
                         mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # (D, M)
            lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
            st = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (N, M)
            pt = tl.math.exp2(st - lse[None, :])
            pt = tl.where(col_ok[:, None], pt, 0.0)
            do = tl.load(do_base + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)  # (N, M)
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)

    dk = dk * sm_scale
    out_mask = (offs_n < seg_end)[:, None] & d_ok[None, :]
    out_off = b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, QOFF, KOFF, ALLOW, QUSED, KUSED,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_dob, s_doh, s_dom, s_dod,
    s_dqb, s_dqh, s_dqm, s_dqd,
    s_qub, s_qus, s_kub, s_kus,
    H, Lq, qk_scale, sm_scale, TUNE_LQ, TUNE_LK,
    NQ: tl.constexpr, NK: tl.constexpr, HAS_QU: tl.constexpr, HAS_KU: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seg, seg_start, m0, seg_end = _block_of(pid_m, QOFF, NQ, BLOCK_M)
    q_end = _used_end(QUSED, b, seg, s_qub, s_qus, seg_start, seg_end, HAS_QU)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_end
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod,
                 mask=q_mask, other=0.0)
    row_base = (b * H + h) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    live = m0 < q_end
    for j in range(NK):
        ok = (tl.load(ALLOW + seg * NK + j) != 0) & live
        ks = tl.load(KOFF + j)
        ke = _used_end(KUSED, b, j, s_kub, s_kus, ks, tl.load(KOFF + j + 1), HAS_KU)
        ke = tl.where(ok, ke, ks)
        for n0 in range(ks, ke, BLOCK_N):
            offs_n = n0 + offs_n0
            col_ok = offs_n < ke
            t_mask = col_ok[None, :] & d_ok[:, None]
            kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, mask=t_mask, other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * s_vn + offs_d[:, None] * s_vd, mask=t_mask, other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(col_ok[None, :], p, 0.0)
            dp = tl.dot(do, vt, input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m < seg_end)[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------------------
# autotuning (GPU only; the interpreter runs fixed blocks)
# --------------------------------------------------------------------------------------------------------------


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# The model's sets hold 49-400 tokens: small tiles keep enough programs in flight there; large ones win on
# long sets. Configs larger than the (power-of-two rounded) set lengths are pruned before timing.
_FWD_CONFIGS = _configs([
    (32, 32, 4, 2), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4),
    (64, 128, 4, 3), (64, 128, 8, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
    (128, 128, 8, 3),
])
_DKDV_CONFIGS = _configs([
    (32, 32, 4, 2), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3),
    (16, 64, 4, 3), (64, 128, 8, 2), (32, 64, 8, 2),
])
_DQ_CONFIGS = _configs([
    (32, 32, 4, 2), (64, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3),
    (64, 16, 4, 3), (128, 64, 8, 2), (64, 32, 8, 2),
])


# 3xTF32 (fp32 without TF32) splits every operand into two TF32 halves: about twice the registers of a tile. The
# (BLOCK_M, BLOCK_N, num_warps, num_stages) that compile without spills on sm_90 for head dims up to 64
# (`compile_check --resources`); wider heads spill with every config, and keep only the one that spills least.
_TF32X3_SPILL_FREE = {
    "fwd": {(32, 32, 4, 2), (64, 32, 4, 3)},
    "dkdv": {(32, 64, 4, 3), (32, 128, 8, 3), (16, 64, 4, 3)},
    "dq": {(32, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3), (64, 16, 4, 3), (64, 32, 8, 2)},
}
_TF32X3_WIDE = {"fwd": (32, 32, 4, 2), "dkdv": (16, 64, 4, 3), "dq": (32, 32, 4, 2)}


def _config_key(config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _prune(configs, named_args, kernel: str | None = None, **kwargs):
    """The configs worth timing; `kernel` ("fwd", "dkdv", "dq") selects the 3xTF32 tiles that do not spill."""
    args = {**named_args, **kwargs}  # the launchers pass the tuning keys as keyword arguments
    lq, lk = args["TUNE_LQ"], args["TUNE_LK"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(lq, 16) and c.kwargs["BLOCK_N"] <= max(lk, 16)]
    if args.get("BLOCK_D", 64) > 128:  # very wide heads: keep the register and shared-memory footprint sane
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or kept
    if args.get("PREC") == "tf32x3" and kernel is not None:
        if args.get("BLOCK_D", 64) <= 64:
            kept = [c for c in kept if _config_key(c) in _TF32X3_SPILL_FREE[kernel]] or kept
        else:
            kept = [c for c in configs if _config_key(c) == _TF32X3_WIDE[kernel]]
    if kept:
        return kept
    smallest = min(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == smallest]


_KEY = ["TUNE_LQ", "TUNE_LK", "NQ", "NK", "HAS_QU", "HAS_KU", "HEAD_DIM", "PREC"]
def _pruning(kernel: str) -> dict:
    return {"early_config_prune": functools.partial(_prune, kernel=kernel)}


_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by=_pruning("fwd"))(_fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by=_pruning("dkdv"))(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY, prune_configs_by=_pruning("dq"))(_bwd_dq_kernel)
_fwd_static_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY + ["Q_OFFS", "K_OFFS"],
                                    prune_configs_by=_pruning("fwd"))(_fwd_static_kernel)


def _pick(name: str, raw, tuned):
    """(kernel, launch kwargs): fixed blocks under the interpreter or when forced, else the autotuner."""
    blocks = (FORCE_BLOCKS or {}).get(name) or (INTERPRET_BLOCKS[name] if _INTERPRET else None)
    if blocks is None:
        return tuned, {}
    return raw, {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "num_warps": 4, "num_stages": 2}


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _offsets(segments: tuple, device: torch.device) -> torch.Tensor:
    """Cumulative set offsets as an int32 device tensor (cached: built once per set layout and device)."""
    return torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _all_allowed(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    return torch.ones(nq, nk, dtype=torch.uint8, device=device)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _precision(dtype: torch.dtype) -> str:
    """fp32 without TF32: 3xTF32 on the tensor cores (about fp32 accuracy), as the InfoNCE kernels; "ieee" FMAs
    spill at most tile sizes. The interpreter computes in fp32 whatever the setting."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"  # ignored for fp16/bf16 operands
    return "ieee" if _INTERPRET else "tf32x3"


def _meta(q_segments, kv_segments, has_q_used: bool, has_kv_used: bool, head_dim: int, precision: str) -> dict:
    return dict(
        TUNE_LQ=_pow2(max(q_segments, default=1)), TUNE_LK=_pow2(max(kv_segments, default=1)),
        NQ=len(q_segments), NK=len(kv_segments), HAS_QU=has_q_used, HAS_KU=has_kv_used,
        HEAD_DIM=head_dim, BLOCK_D=max(16, _pow2(head_dim)), PREC=precision,
    )


def _common(q, q_segments, kv_segments, allow, q_used, kv_used):
    device = q.device
    qoff = _offsets(tuple(q_segments), device)
    koff = _offsets(tuple(kv_segments), device)
    if allow is None:
        allow_t = _all_allowed(len(q_segments), len(kv_segments), device)
    else:
        allow_t = allow.to(device=device).contiguous()
        allow_t = allow_t.view(torch.uint8) if allow_t.dtype == torch.bool else allow_t.to(torch.uint8)
    qu = q_used if q_used is not None else qoff
    ku = kv_used if kv_used is not None else koff
    qu_strides = tuple(q_used.stride()) if q_used is not None else (0, 0)
    ku_strides = tuple(kv_used.stride()) if kv_used is not None else (0, 0)
    meta = _meta(q_segments, kv_segments, q_used is not None, kv_used is not None, q.shape[-1], _precision(q.dtype))
    return qoff, koff, allow_t, qu, ku, qu_strides + ku_strides, meta


@functools.lru_cache(maxsize=256)
def _launch_plan(q_segments: tuple, kv_segments: tuple, device: torch.device, has_q_used: bool, has_kv_used: bool,
                 head_dim: int, precision: str) -> tuple:
    """What `_common` rebuilds per call, built once per layout: (set offsets of q and kv, the all-allowed table,
    the launch constants)."""
    return (_offsets(q_segments, device), _offsets(kv_segments, device),
            _all_allowed(len(q_segments), len(kv_segments), device),
            _meta(q_segments, kv_segments, has_q_used, has_kv_used, head_dim, precision))


def _common_lean(q, q_segments, kv_segments, allow, q_used, kv_used):
    """`_common` with its tables from `_launch_plan` and a bool `allow` read by the kernels as it is."""
    qoff, koff, all_allowed, meta = _launch_plan(tuple(q_segments), tuple(kv_segments), q.device,
                                                 q_used is not None, kv_used is not None, q.shape[-1],
                                                 _precision(q.dtype))
    if allow is None:
        allow_t = all_allowed
    elif allow.dtype == torch.bool and allow.device == q.device and allow.is_contiguous():
        allow_t = allow
    else:
        allow_t = allow.to(device=q.device, dtype=torch.uint8).contiguous()
    qu = q_used if q_used is not None else qoff
    ku = kv_used if kv_used is not None else koff
    qu_strides = tuple(q_used.stride()) if q_used is not None else (0, 0)
    ku_strides = tuple(kv_used.stride()) if kv_used is not None else (0, 0)
    return qoff, koff, allow_t, qu, ku, qu_strides + ku_strides, meta


def _n_blocks(segments: Sequence[int], block: int) -> int:
    return sum(triton.cdiv(n, block) for n in segments)


def _new_output(q, lean: bool) -> torch.Tensor:
    """(B, H, Lq, D); with `lean` stored as (B, Lq, H, D), the layout the block's output projection reads, so
    that merging the heads is a view instead of a copy."""
    batch, heads, lq, d = q.shape
    if lean:
        return torch.empty((batch, lq, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty((batch, heads, lq, d), dtype=q.dtype, device=q.device)


def _packed_grad_views(buffer, q_shape, k_shape) -> tuple:
    """dq, dk, dv as (B, H, L, D) views of one flat buffer: (B, L, 3, H, D) when q and k have the same length
    (self-attention: the layout of the model's qkv projection), else (B, Lq, H, D) then (B, Lk, 2, H, D)."""
    batch, heads, lq, d = q_shape
    lk = k_shape[2]
    if lq == lk:
        qkv = buffer.view(batch, lq, 3, heads, d)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    n_q = batch * lq * heads * d
    kv = buffer[n_q:].view(batch, lk, 2, heads, d)
    return buffer[:n_q].view(batch, lq, heads, d).transpose(1, 2), kv[:, :, 0].transpose(1, 2), \
        kv[:, :, 1].transpose(1, 2)


def _forward(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale, lean=False, static_layout=False):
    batch, heads, lq, d = q.shape
    out = _new_output(q, lean)
    lse = torch.empty((batch, heads, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    common = _common_lean if lean else _common
    qoff, koff, allow_t, qu, ku, used_strides, meta = common(q, q_segments, kv_segments, allow, q_used, kv_used)

    def grid(m):
        return (_n_blocks(q_segments, m["BLOCK_M"]), heads, batch)

    if static_layout:
        kernel, launch = _pick("fwd", _fwd_static_kernel, _fwd_static_tuned)
        kernel[grid](
            q, k, v, out, lse, allow_t, qu, ku,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *used_strides,
            heads, lq, scale * LOG2E, Q_OFFS=tuple(itertools.accumulate(q_segments, initial=0)),
            K_OFFS=tuple(itertools.accumulate(kv_segments, initial=0)), **meta, **launch,
        )
        return out, lse
    kernel, launch = _pick("fwd", _fwd_kernel, _fwd_tuned)
    kernel[grid](
        q, k, v, out, lse, qoff, koff, allow_t, qu, ku,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *used_strides,
        heads, lq, scale * LOG2E, **meta, **launch,
    )
    return out, lse


def _backward(do, q, k, v, out, lse, q_segments, kv_segments, allow, q_used, kv_used, scale, packed=False):
    """(dq, dk, dv); with `packed`, (one flat buffer holding the three, as `_packed_grad_views` lays it out,)."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    if packed:
        buffer = torch.empty(q.numel() + 2 * k.numel(), dtype=q.dtype, device=q.device)
        dq, dk, dv = _packed_grad_views(buffer, q.shape, k.shape)
        result = (buffer,)
    else:
        dq = torch.empty((batch, heads, lq, d), dtype=q.dtype, device=q.device)
        dk = torch.empty((batch, heads, lk, d), dtype=k.dtype, device=k.device)
        dv = torch.empty((batch, heads, lk, d), dtype=v.dtype, device=v.device)
        result = (dq, dk, dv)
    if batch * heads == 0 or d == 0:
        return result
    if lq == 0 or lk == 0:
        for t in result:
            t.zero_()
        return result
    common = _common_lean if packed else _common
    qoff, koff, allow_t, qu, ku, used_strides, meta = common(q, q_segments, kv_segments, allow, q_used, kv_used)
    block_d = meta["BLOCK_D"]

    delta = torch.empty((batch, heads, lq), dtype=torch.float32, device=q.device)
    pre_block = 64
    _bwd_preprocess[(triton.cdiv(lq, pre_block), heads, batch)](
        out, do, delta, *out.stride(), *do.stride(), heads, lq, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_block,
    )

    kernel, launch = _pick("dkdv", _bwd_dkdv_kernel, _dkdv_tuned)

    def grid_kv(m):
        return (_n_blocks(kv_segments, m["BLOCK_N"]), heads, batch)

    kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, qoff, koff, allow_t, qu, ku,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *used_strides,
        heads, lq, scale * LOG2E, scale, **meta, **launch,
    )

    kernel, launch = _pick("dq", _bwd_dq_kernel, _dq_tuned)

    def grid_q(m):
        return (_n_blocks(q_segments, m["BLOCK_M"]), heads, batch)

    kernel[grid_q](
        q, k, v, do, lse, delta, dq, qoff, koff, allow_t, qu, ku,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *used_strides,
        heads, lq, scale * LOG2E, scale, **meta, **launch,
    )
    return result


# --------------------------------------------------------------------------------------------------------------
# custom ops (torch.compile-traceable) and autograd
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mmfuse::modality_attention_fwd", mutates_args=())
def modality_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segments: list[int], kv_segments: list[int],
    allow: Optional[torch.Tensor], q_used: Optional[torch.Tensor], kv_used: Optional[torch.Tensor], scale: float,
    lean: bool = False, static_layout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Lq, D), lse (B, H, Lq) fp32, base 2, +inf where a row has no key). `lean` and `static_layout`:
    the A/B variants of the module docstring (`out` stored as (B, Lq, H, D) with `lean`)."""
    return _forward(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale, lean, static_layout)


@modality_attention_fwd.register_fake
def _(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale, lean=False, static_layout=False):
    batch, heads, lq, d = q.shape
    return _new_output(q, lean), q.new_empty((batch, heads, lq), dtype=torch.float32)


@torch.library.custom_op("mmfuse::modality_attention_bwd", mutates_args=())
def modality_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    q_segments: list[int], kv_segments: list[int], allow: Optional[torch.Tensor], q_used: Optional[torch.Tensor],
    kv_used: Optional[torch.Tensor], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, q_segments, kv_segments, allow, q_used, kv_used, scale)


@modality_attention_bwd.register_fake
def _(do, q, k, v, out, lse, q_segments, kv_segments, allow, q_used, kv_used, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


@torch.library.custom_op("mmfuse::modality_attention_bwd_packed", mutates_args=())
def modality_attention_bwd_packed(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    q_segments: list[int], kv_segments: list[int], allow: Optional[torch.Tensor], q_used: Optional[torch.Tensor],
    kv_used: Optional[torch.Tensor], scale: float,
) -> torch.Tensor:
    """dq, dk, dv in one flat buffer (`_packed_grad_views` gives the three): one allocation instead of three. One
    output, not three views of it: a custom op's outputs may not alias each other."""
    (buffer,) = _backward(do, q, k, v, out, lse, q_segments, kv_segments, allow, q_used, kv_used, scale, packed=True)
    return buffer


@modality_attention_bwd_packed.register_fake
def _(do, q, k, v, out, lse, q_segments, kv_segments, allow, q_used, kv_used, scale):
    return q.new_empty(q.numel() + 2 * k.numel())


def _setup_context(ctx, inputs, output):
    q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale, lean, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, allow, q_used, kv_used)
    ctx.q_segments, ctx.kv_segments, ctx.scale, ctx.lean = list(q_segments), list(kv_segments), scale, lean
    ctx.mark_non_differentiable(lse)
    # lean: no zeros tensor materialized for the gradient of `lse`, which the formula never reads
    ctx.set_materialize_grads(not lean)


def _backward_formula(ctx, dout, dlse):
    q, k, v, out, lse, allow, q_used, kv_used = ctx.saved_tensors
    none = (None,) * 8
    if dout is None:  # only without materialized gradients: `out` did not reach the loss
        return (None, None, None) + none
    args = (dout, q, k, v, out, lse, ctx.q_segments, ctx.kv_segments, allow, q_used, kv_used, ctx.scale)
    if ctx.lean:
        buffer = torch.ops.mmfuse.modality_attention_bwd_packed(*args)
        return _packed_grad_views(buffer, q.shape, k.shape) + none
    dq, dk, dv = torch.ops.mmfuse.modality_attention_bwd(*args)
    return (dq, dk, dv) + none


modality_attention_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernels cover inputs of this dtype and head dimension (no float64, 1 <= head_dim <= 256)."""
    return dtype != torch.float64 and 0 < head_dim <= MAX_HEAD_DIM


def modality_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segments: Sequence[int], kv_segments: Sequence[int],
    allow: torch.Tensor | None = None, q_used: torch.Tensor | None = None, kv_used: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton backend of `mmfuse_fast.ops.modality_attention` (inputs already validated there, `supports` true)."""
    d = q.shape[-1]
    if not supports(q.dtype, d):
        raise ValueError(f"modality_attention_triton: no kernel for {q.dtype} with head dim {d}")
    scale = float(d**-0.5 if scale is None else scale)
    for name, value, names in (("WRAPPER", WRAPPER, WRAPPERS), ("KERNEL", KERNEL, KERNELS)):
        if value not in names:
            raise ValueError(f"mmfuse_fast.kernels.modality_attention.{name} (env MMFUSE_ATTN_{name}) is {value!r}; "
                             f"expected one of {', '.join(names)}")
    out, _ = torch.ops.mmfuse.modality_attention_fwd(
        q, k, v, [int(n) for n in q_segments], [int(n) for n in kv_segments], allow, q_used, kv_used, scale,
        WRAPPER == "lean", KERNEL == "static")
    return out
