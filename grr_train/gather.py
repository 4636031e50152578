"""All-gather with gradient, for contrastive negatives across DDP ranks.

`torch.distributed.all_gather` cuts the graph; this one sends each rank the gradient that all
ranks' losses put on its own rows. Backward all-reduces (sums) the gathered gradient and keeps
this rank's slice, so the gradient reaching the local embeddings is that of the SUM of the
ranks' losses; DDP then averages parameter gradients over ranks, which gives the gradient of
the mean loss. An all-reduce rather than a reduce-scatter because gloo has no reduce-scatter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...), rank r's rows at [r * B, (r + 1) * B).

    Every rank must pass the same B (the loaders give every rank the same batch size).
    Without an initialised process group (or with one rank) returns x itself.
    """
    _, world = distributed_world()
    if world == 1:
        return x
    return _AllGather.apply(x)
