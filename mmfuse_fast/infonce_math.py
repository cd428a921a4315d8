"""Math and collectives shared by the implementations of `multiscale_infonce`: the plain-PyTorch ones in `ops/`
(reference, chunked) and the Triton one in `kernels/`. It imports neither package.

Math (per scale s, A = anchors[s], V = views[s], L = A Vᵀ / τ, c = 1 / (S·B·(1 + symmetric))):

    loss  = c · Σ_s [ Σ_i (rowLSE_i − L_ii) + symmetric · Σ_j (colLSE_j − L_jj) ]
    G     = c · ( softmax_row(L) + symmetric · softmax_col(L) − (1 + symmetric) · I )
    dA    = G V / τ,      dV = Gᵀ A / τ,      dτ = −Σ G ∘ L / τ = −(1/τ) Σ_i A_i · dA_i

The memory-linear implementations keep only rowLSE (S, b) and colLSE (S, B_cols) and recompute the logits in
backward.

Distributed (`group`): every rank holds b = B / world rows. It scores its rows against the gathered views (the
global columns) in ONE pass: its row LSEs are complete; its column LSEs are partial (its rows only) and are merged
across ranks with two small all_reduces (max, then sum of exp). The loss of the rank's rows and of the rank's own
columns is summed and all_reduced, so every rank returns the global loss. Backward gives each rank the gradient of
the global loss restricted to its row block; the all_gather of the views sums the column gradients of all ranks, so
the local embeddings receive exactly d(global loss)/d(local embeddings), as in `multiscale_infonce_reference`.
The loss is computed in fp32 (fp64 for fp64 inputs) whatever the autocast state: under bf16 autocast the
positive logits and the chunked products would otherwise be bf16 matmuls, ~0.04 nats off per term at τ = 0.1.

The temperature gradient on each rank is its block's share; their sum over ranks is the single-process gradient
(the same convention as the reference, and what DDP's gradient all-reduce expects).
"""

from __future__ import annotations

import functools

import torch


class _AllGatherBatch(torch.autograd.Function):
    """Concatenates `x` (S, b, D) of every rank along dim 1; backward sums the gradients of all ranks.

    Not torch.distributed.nn.functional.all_gather: its backward on gloo (torch 2.13) scatters into
    `empty_like` buffers of the non-contiguous gradient slices that torch.cat's backward hands it, which
    silently permutes the gradient elements of any tensor gathered along a non-leading dimension.
    """

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        n_scales, n_global, dim = grad.shape
        per_rank = grad.reshape(n_scales, world, n_global // world, dim).transpose(0, 1).contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(per_rank[0])
            dist.reduce_scatter_tensor(out, per_rank.flatten(0, 1), group=ctx.group)
            return out, None
        dist.all_reduce(per_rank, group=ctx.group)  # gloo has no reduce_scatter
        return per_rank[rank], None


def all_gather_batch(x: torch.Tensor, group) -> torch.Tensor:
    """(S, b, D) on every rank -> (S, world·b, D), differentiable: each rank gets the sum of all ranks' gradients."""
    return _AllGatherBatch.apply(x, group)


def without_autocast(method):
    """Runs an autograd.Function's forward or backward (`method(ctx, *args)`) with autocast off on the device of
    its first tensor argument, so that every product inside keeps the dtype the implementation chose."""

    @functools.wraps(method)
    def run(ctx, *args):
        device_type = "cpu"
        for arg in args:
            if isinstance(arg, torch.Tensor):
                device_type = arg.device.type
                break
        with torch.autocast(device_type, enabled=False):
            return method(ctx, *args)

    return run


def temperature_tensor(temperature, device, dtype=torch.float32) -> torch.Tensor:
    """The temperature as a 0-d tensor on `device` (no host round trip for tensors)."""
    if isinstance(temperature, torch.Tensor):
        return temperature.detach().to(device=device, dtype=dtype)
    return torch.full((), float(temperature), device=device, dtype=dtype)


def group_info(group):
    """(rank, world) of `group`, or (0, 1) without one."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def gather_columns(views: torch.Tensor, group) -> torch.Tensor:
    """All views of the group concatenated along the batch, differentiable (backward sums over ranks)."""
    if group is None:
        return views
    return all_gather_batch(views, group)


def function_args(anchors, views, temperature, symmetric, group) -> tuple:
    """The leading arguments both autograd Functions (chunked and Triton) take: anchors, the global columns, the
    temperature as a tensor or a float, symmetric, this rank's first row, the global batch and the group."""
    rank, _ = group_info(group)
    cols = gather_columns(views, group)
    temp_t = temperature if isinstance(temperature, torch.Tensor) else None
    temp_v = None if temp_t is not None else float(temperature)
    return anchors, cols, temp_t, temp_v, bool(symmetric), rank * views.shape[1], cols.shape[1], group


def all_gather_nograd(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def merge_partial_lse(partial_lse: torch.Tensor, group, base2: bool = False) -> torch.Tensor:
    """log Σ_ranks exp(partial_lse), elementwise (log2/exp2 when `base2`); identity without a group. No host sync."""
    if group is None:
        return partial_lse
    import torch.distributed as dist

    top = partial_lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (torch.exp2 if base2 else torch.exp)(partial_lse - top_safe)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return top_safe + (torch.log2 if base2 else torch.log)(total)


def assemble_loss(row_lse, col_lse, pos, symmetric: bool, row_offset: int, n_global: int, group):
    """Global loss from the statistics of this rank: its rows, and its own columns (the diagonal block)."""
    n_scales, b = pos.shape
    total = (row_lse - pos).sum()
    if symmetric:
        total = total + (col_lse[:, row_offset:row_offset + b] - pos).sum()
    loss = total / (n_scales * n_global * (2 if symmetric else 1))
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(loss, group=group)
    return loss


def loss_scale(n_scales: int, n_global: int, symmetric: bool) -> float:
    return 1.0 / (n_scales * n_global * (2 if symmetric else 1))


def finish_grads(ctx, d_anchors_acc, d_cols_acc, anchors_c, inv_t, grad_tau_needed):
    """Casts the fp32 accumulators to the input dtypes and derives dτ = −(1/τ) Σ A · dA."""
    d_tau = None
    if grad_tau_needed:
        d_tau = -(inv_t * (anchors_c * d_anchors_acc).sum())
        d_tau = d_tau.to(device=ctx.tau_device, dtype=ctx.tau_dtype)
    return d_anchors_acc.to(ctx.anchors_dtype), d_cols_acc.to(ctx.views_dtype), d_tau
