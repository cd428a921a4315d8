"""Worker of the 2-process gloo test of `multiscale_infonce(group=...)` (spawned by tests/ops/test_infonce.py).

Every rank builds the same global batch, keeps its slice of rows, runs the op with the process group, and checks
against the single-process reference on the concatenated batch: the loss (equal on every rank), the gradients of
its local anchors and views, and the temperature gradient summed over ranks. After the teardown it checks that
the gloo worker threads are gone.
"""

from __future__ import annotations

import gc
import os

# Imported before init_process_group. mmfuse_fast.ops imports torch._dynamo, which imports
# torch.distributed.nn.functional, whose functions take `group=group.WORLD` as a default argument evaluated at
# import: imported after init_process_group, those defaults hold the default group for the life of the process.
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmfuse_fast.ops import multiscale_infonce
from mmfuse_fast.ops.reference import multiscale_infonce_reference

CASES = [  # (S, local batch, D, shared anchors, symmetric, tensor temperature)
    (2, 5, 12, False, True, True),
    (1, 3, 8, True, False, False),
    (3, 4, 33, True, True, True),
]


def gloo_worker_threads() -> list[str]:
    """Names of this process's gloo threads (Linux; empty elsewhere)."""
    tasks = "/proc/self/task"
    names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
    return [n for n in names if "gloo" in n]


def _check_cases(rank: int, world: int, backends: list[str]) -> None:
    for backend in backends:
        for case_id, (n_scales, local, dim, shared, symmetric, tensor_t) in enumerate(CASES):
            gen = torch.Generator().manual_seed(100 + case_id)
            views = F.normalize(torch.randn(n_scales, local * world, dim, generator=gen), dim=-1)
            anchor_shape = (local * world, dim) if shared else (n_scales, local * world, dim)
            anchors = F.normalize(torch.randn(*anchor_shape, generator=gen), dim=-1)

            def temp():
                return torch.tensor(0.15, requires_grad=True) if tensor_t else 0.15

            # single-process oracle on the concatenated batch
            a_full, v_full, t_full = anchors.clone().requires_grad_(), views.clone().requires_grad_(), temp()
            expected = multiscale_infonce_reference(a_full, v_full, t_full, symmetric)
            expected.backward()

            rows = slice(rank * local, (rank + 1) * local)
            a_loc = anchors[rows].clone().requires_grad_() if shared else anchors[:, rows].clone().requires_grad_()
            v_loc = views[:, rows].clone().requires_grad_()
            t_loc = temp()
            got = multiscale_infonce(a_loc, v_loc, t_loc, symmetric, group=dist.group.WORLD, backend=backend)
            got.backward()

            where = f"backend={backend} case={case_id} rank={rank}"
            torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-5, msg=where)
            want_a = a_full.grad[rows] if shared else a_full.grad[:, rows]
            torch.testing.assert_close(a_loc.grad, want_a, rtol=1e-4, atol=1e-6, msg=where)
            torch.testing.assert_close(v_loc.grad, v_full.grad[:, rows], rtol=1e-4, atol=1e-6, msg=where)
            if tensor_t:
                t_sum = t_loc.grad.detach().clone()
                dist.all_reduce(t_sum)
                torch.testing.assert_close(t_sum, t_full.grad, rtol=1e-4, atol=1e-5, msg=where)


def run(rank: int, world: int, port: int, backends: list[str]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # The autograd graphs of the cases reference the group; they are freed when this call returns.
        _check_cases(rank, world, backends)
    finally:
        dist.destroy_process_group()
    # A gloo worker thread releases the tensors of a collective after wait() has returned, which takes the GIL.
    # Until the group is freed (its destructor joins those threads) one may still be waiting for the GIL, and
    # if the interpreter is finalizing by then the thread is killed inside a noexcept destructor: SIGABRT,
    # "terminate called without an active exception". So nothing may keep the group alive past the teardown.
    gc.collect()
    assert not gloo_worker_threads(), f"rank {rank}: gloo threads outlive the process group: {gloo_worker_threads()}"
