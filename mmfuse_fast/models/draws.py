"""Random draws of a model under data parallelism: every draw (masks, crop boxes, sensor drops) is made for the
global batch and sliced to this rank's rows, so a data-parallel run computes exactly what one process does on the
global batch, whatever the world size (docs/architecture.md, Distributed)."""

from __future__ import annotations

import torch

from mmfuse_fast import ops


class GlobalBatchDraws:
    """Mixin for models: `set_data_parallel_group` (the contract's hook) and draws of this rank's rows."""

    _data_parallel_group = None
    _shard = (0, 1)  # (rank, world)

    def set_data_parallel_group(self, group) -> None:
        """The engine's data-parallel process group (None: one process); not part of the state_dict."""
        self._data_parallel_group = group
        self._shard = (0, 1)
        if group is not None:
            import torch.distributed as dist

            self._shard = (dist.get_rank(group), dist.get_world_size(group))

    @property
    def data_parallel_group(self):
        return self._data_parallel_group

    @property
    def world_size(self) -> int:
        return self._shard[1]

    def _rows(self, batch: int) -> slice:
        rank = self._shard[0]
        return slice(rank * batch, (rank + 1) * batch)

    def draw_uniform(self, batch: int, *shape: int, device, generator=None) -> torch.Tensor:
        """(batch, *shape) uniform [0, 1) numbers: this rank's rows of one draw for the global batch."""
        return torch.rand(batch * self._shard[1], *shape, device=device, generator=generator)[self._rows(batch)]

    def draw_boxes(self, batch: int, height: int, width: int, scale, device, generator=None) -> torch.Tensor:
        """(batch, 4) random crop boxes (ops.random_boxes): this rank's rows of one draw for the global batch."""
        return ops.random_boxes(batch * self._shard[1], height, width, scale=tuple(scale), generator=generator,
                                device=device)[self._rows(batch)]
