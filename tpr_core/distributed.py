"""The global batch across ranks: what the batch-level loss terms compare.

The published methods were trained on one GPU, so every batch-level term (SDM, A-SDM, EFA,
the triplet, CMPM) compares each sample with every other sample of the whole batch. With N
data-parallel ranks each rank holds 1/N of that batch. :class:`GlobalBatch` gathers, from
every rank, what a term compares across samples, so that the term sees the global batch:

- ``gather(t)``: the (b, ...) local tensor -> the (N*b, ...) global tensor, rows in rank
  order (rank 0's rows first). Floating tensors keep their gradient: the backward sums the
  gradient that every rank computed for the gathered tensor and hands each rank the rows it
  produced.
- ``mean(total, count)``: a mean over the global batch of a per-item sum (MLM over its masked
  tokens, restoration over its dropped patches), scaled so that the mean over ranks of the
  returned values is the global mean.

Why the value and every parameter's gradient equal one process on the concatenated batch:
every rank computes the same global term L on the same gathered tensors. Rank r's local
features f_r receive, through the backward of ``gather``, the sum over ranks of dL/df_r,
i.e. N * dL/df_r. The data-parallel engine (DeepSpeed) averages parameter gradients over the
N ranks, so the parameter gradient is sum_r dL/df_r * df_r/dtheta = dL/dtheta. Per-sample
terms (ID, MLM, restoration) stay local; averaged over ranks they are the global means.

The batch-level terms are computed in full on every rank (their cost is quadratic in the
global batch, which is small next to the encoders: see ``bench/gather_cost.py``).

Every rank must hold the same number of rows: the samplers drop the last incomplete global
batch of an epoch, so every micro-batch of every rank has ``data.batch_size / (workers x
grad_accum)`` rows.

:data:`LOCAL` is the identity scope: one process, or ``loss.gather: local`` (each rank's terms
see its own share only, the behaviour before the gather existed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LOCAL", "BatchScope", "GlobalBatch", "LocalBatch", "batch_scope"]

# torch 2.14 renamed all_gather_into_tensor (which now warns on every call) to all_gather_single.
_all_gather_rows = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gathered gradient over ranks and
    returns this rank's rows (works on gloo, which has no reduce_scatter, and on NCCL)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_rows(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return mine, None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return total[start : start + ctx.rows], None


class BatchScope:
    """What the batch-level loss terms see; :class:`LocalBatch` or :class:`GlobalBatch`."""

    world_size: int = 1

    def __call__(self, t: Tensor) -> Tensor:
        """``t`` as the loss terms should see it (local rows, or every rank's)."""
        raise NotImplementedError

    def many(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Several tensors of one dtype with the same rows, as ``self(t)`` each, in one
        collective (their rows are concatenated, gathered once and split again)."""
        if self.world_size == 1 or len(tensors) == 1:
            return tuple(self(t) for t in tensors)
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
        gathered = self(flat)
        out, start = [], 0
        for t in tensors:
            width = t[0].numel()
            out.append(gathered[:, start : start + width].reshape(-1, *t.shape[1:]))
            start += width
        return tuple(out)

    def mean(self, total: Tensor, count: Tensor | int) -> Tensor:
        """This rank's share of a mean whose numerator ``total`` is a sum over local items and
        ``count`` the number of local items."""
        raise NotImplementedError


class LocalBatch(BatchScope):
    """Each process's own rows only (one process, or ``loss.gather: local``)."""

    def __call__(self, t: Tensor) -> Tensor:
        return t

    def mean(self, total: Tensor, count: Tensor | int) -> Tensor:
        return total / max(int(count), 1)


LOCAL = LocalBatch()


class GlobalBatch(BatchScope):
    """Every rank's rows of the current micro-batch, in rank order (see the module docstring).

    Args:
        group: the process group (default: the world).
    """

    def __init__(self, group=None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GlobalBatch needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)

    def __call__(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        if t.requires_grad:
            return _AllGatherWithGrad.apply(t, self.group)
        out = t.new_empty((self.world_size * t.shape[0], *t.shape[1:]))
        _all_gather_rows(out, t.contiguous(), group=self.group)
        return out

    def mean(self, total: Tensor, count: Tensor | int) -> Tensor:
        n = torch.as_tensor(count, dtype=torch.float64, device=total.device).reshape(1).clone()
        if self.world_size > 1:
            dist.all_reduce(n, op=dist.ReduceOp.SUM, group=self.group)
        # Averaged over the ranks (as the engine averages gradients): sum_r total_r / n_global.
        return total * (self.world_size / float(n.clamp_min(1.0)))


def batch_scope(mode: str, group=None) -> BatchScope:
    """The scope named by ``loss.gather``: ``global`` (gather across ranks when a process group
    of more than one rank is running) or ``local``."""
    if mode == "local":
        return LOCAL
    if mode != "global":
        raise ValueError(f"unknown loss.gather {mode!r}; use 'global' or 'local'")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return LOCAL
    return GlobalBatch(group)
