"""Data-parallel gradient averaging for coroutine models.

Why not plain DDP: DDP hooks into ``forward`` (it arms its gradient hooks there), but a model's
work happens in ``model.steps``, a coroutine resumed several times per step by
``pipeline.train.microbatch``; DDP's hooks would never be armed and the gradients would silently stay
local. So the train loop drives the bare module and this class does what DDP would: rank 0's
parameters and buffers are broadcast once at the start, and after all micro-batches of a step
have run backward, the gradients are averaged in one flattened all-reduce (what DDP does with
``no_sync`` over the first micro-batches and a synchronised last one). Floating buffers (running
baselines, batch-norm statistics) are averaged after ``end_step`` so that every rank keeps the
same model. Without an initialised process group every method is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GradSync:
    """Keeps the replicas of ``model`` identical across the default process group."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.world = world_size()

    def broadcast_state(self) -> None:
        """Copy rank 0's parameters and buffers to every rank (as DDP's constructor does)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self) -> None:
        """Replace every parameter's ``.grad`` by its mean over ranks (missing grads count as 0)."""
        if self.world == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # unused on this rank this step; still takes part in the sum
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def average_buffers(self) -> None:
        """Average floating-point buffers over ranks (integer buffers are left as they are)."""
        if self.world == 1:
            return
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = _flatten_dense_tensors(buffers)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world)
        for buf, synced in zip(buffers, _unflatten_dense_tensors(flat, buffers), strict=True):
            buf.copy_(synced)
