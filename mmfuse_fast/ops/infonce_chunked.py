"""Memory-linear `multiscale_infonce` in plain PyTorch (the CPU path of `backend="auto"`).

Same algorithm as the Triton kernels, expressed with chunks of rows instead of register tiles: the S x B x B
logits never exist, only S x chunk x B_cols slices of them (a fixed byte budget), plus O(S·B) statistics. Forward
keeps only rowLSE (S, b) and colLSE (S, B_cols); backward recomputes the logits chunk by chunk. The math and the
distributed scheme: mmfuse_fast/infonce_math.py.
"""

from __future__ import annotations

import torch

from mmfuse_fast.infonce_math import assemble_loss, finish_grads, function_args, loss_scale, merge_partial_lse, \
    temperature_tensor, without_autocast

DEFAULT_CHUNK_BYTES = 32 * 2**20  # bytes of one fp32 S x chunk x B_cols logits slice


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(n_scales: int, n_cols: int, chunk_bytes: int, elem: int = 4) -> int:
    return max(1, chunk_bytes // max(1, n_scales * n_cols * elem))


class _ChunkedInfoNCE(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, anchors, cols, temperature, temp_value, symmetric, row_offset, n_global, group, chunk_bytes):
        # anchors: (b, D) or (S, b, D) local rows; cols: (S, Bc, D) all columns (the gathered views).
        n_scales, n_cols, _ = cols.shape
        b = anchors.shape[-2]
        cdt = compute_dtype(cols.dtype)
        tau = temperature_tensor(temperature if temperature is not None else temp_value, cols.device, cdt)
        inv_t = 1.0 / tau
        a_c = anchors.to(cdt)
        a3 = a_c.expand(n_scales, -1, -1) if a_c.dim() == 2 else a_c
        v_c = cols.to(cdt)

        a_scaled = a3 * inv_t  # 1/τ folded into the (small) rows operand
        pos = torch.einsum("sbd,sbd->sb", a_scaled, v_c[:, row_offset:row_offset + b])  # (S, b)
        row_lse = torch.empty(n_scales, b, device=cols.device, dtype=cdt)
        col_part = torch.full((n_scales, n_cols), float("-inf"), device=cols.device, dtype=cdt) if symmetric else None
        step = _rows_per_chunk(n_scales, n_cols, chunk_bytes, torch.finfo(cdt).bits // 8)
        tiny = torch.finfo(cdt).tiny * 2.0**24
        v_t = v_c.transpose(1, 2)
        for i0 in range(0, b, step):
            logits = torch.bmm(a_scaled[:, i0:i0 + step], v_t)  # (S, rows, Bc)
            row_max = logits.amax(dim=-1, keepdim=True)  # (S, rows, 1)
            probs = torch.sub(logits, row_max).exp_()  # the only exp of the forward
            row_sum = probs.sum(dim=-1, keepdim=True)
            row_lse[:, i0:i0 + step] = (row_max + row_sum.log()).squeeze(-1)
            if symmetric:
                # column partial sums from the same exponentials: Σ_i e^(L_ij) = e^c Σ_i e^(L_ij - m_i) e^(m_i - c)
                chunk_max = row_max.amax(dim=1, keepdim=True)  # (S, 1, 1)
                weights = torch.exp(row_max - chunk_max).transpose(1, 2)  # (S, 1, rows), in (0, 1]
                col_sum = torch.bmm(weights, probs).squeeze(1)  # (S, Bc)
                chunk_lse = chunk_max.squeeze(-1) + col_sum.log()
                # A column whose entries in this chunk all lie ≳ 70 nats below the chunk's maximum loses precision
                # (e^-70 times fp32 epsilon): recompute such chunks exactly. On CPU the test costs nothing; on
                # other devices (fallback path only) and under torch.compile (a data-dependent branch breaks the
                # graph) the exact form is always used, which needs no host sync.
                if not logits.is_cpu or torch.compiler.is_compiling() or bool((col_sum < tiny).any()):
                    chunk_lse = torch.logsumexp(logits, dim=1)
                torch.logaddexp(col_part, chunk_lse, out=col_part)
            del logits, probs
        col_lse = merge_partial_lse(col_part, group) if symmetric else None
        loss = assemble_loss(row_lse, col_lse, pos, symmetric, row_offset, n_global, group)

        ctx.save_for_backward(anchors, cols, tau, row_lse, col_lse if symmetric else row_lse)
        ctx.symmetric, ctx.row_offset, ctx.n_global, ctx.step = symmetric, row_offset, n_global, step
        ctx.tau_needs_grad = temperature is not None and ctx.needs_input_grad[2]
        if temperature is not None:
            ctx.tau_device, ctx.tau_dtype = temperature.device, temperature.dtype
        ctx.anchors_dtype, ctx.views_dtype = anchors.dtype, cols.dtype
        return loss.to(cdt)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        anchors, cols, tau, row_lse, col_lse = ctx.saved_tensors
        symmetric, row_offset, step = ctx.symmetric, ctx.row_offset, ctx.step
        n_scales, n_cols, _ = cols.shape
        b = anchors.shape[-2]
        cdt = row_lse.dtype
        inv_t = 1.0 / tau
        a_c = anchors.to(cdt)
        a3 = a_c.expand(n_scales, -1, -1) if a_c.dim() == 2 else a_c
        v_c = cols.to(cdt)
        scale = grad_out.to(cdt) * loss_scale(n_scales, ctx.n_global, symmetric) * inv_t
        a_scaled = a3 * inv_t
        v_t = v_c.transpose(1, 2)
        v_grad = v_c * scale  # the gradient scale folded into the operands of the two gradient products

        d_a3 = torch.empty(n_scales, b, a3.shape[-1], device=cols.device, dtype=cdt)
        d_cols = torch.zeros(n_scales, n_cols, cols.shape[-1], device=cols.device, dtype=cdt)
        n_pos = 2.0 if symmetric else 1.0
        for i0 in range(0, b, step):
            i1 = min(b, i0 + step)
            logits = torch.bmm(a_scaled[:, i0:i1], v_t)  # (S, rows, Bc)
            grad = torch.sub(logits, row_lse[:, i0:i1, None]).exp_()
            if symmetric:
                grad += logits.sub_(col_lse[:, None, :]).exp_()
            del logits
            rows = torch.arange(i1 - i0, device=cols.device)
            grad[:, rows, rows + row_offset + i0] -= n_pos
            d_a3[:, i0:i1] = torch.bmm(grad, v_grad)
            d_cols.baddbmm_(grad.transpose(1, 2), a3[:, i0:i1] * scale)
            del grad
        d_a = d_a3.sum(0) if anchors.dim() == 2 else d_a3
        d_anchors, d_cols, d_tau = finish_grads(ctx, d_a, d_cols, a_c, inv_t, ctx.tau_needs_grad)
        if not ctx.needs_input_grad[0]:
            d_anchors = None
        if not ctx.needs_input_grad[1]:
            d_cols = None
        return d_anchors, d_cols, d_tau, None, None, None, None, None, None


def multiscale_infonce_chunked(anchors, views, temperature=0.1, symmetric=True, group=None,
                               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """`multiscale_infonce` without B x B storage, in plain PyTorch (any device)."""
    return _ChunkedInfoNCE.apply(*function_args(anchors, views, temperature, symmetric, group), int(chunk_bytes))
