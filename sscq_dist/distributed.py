"""Small collective helpers used by the losses and the neighbour bank.

All helpers are no-ops in a single process (torch.distributed not initialised or world
size 1), so the same loss code runs in tests, on one worker and on many.
Every helper is a collective: when the world size is > 1, all ranks must call it in the
same order with tensors of the same shape.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

# The autograd all-gather is the documented way to gather with gradient; its deprecation
# notice would otherwise print once per worker process.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated", category=FutureWarning
)


def world_info() -> tuple[int, int]:
    """(world_size, rank) of the default process group; (1, 0) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (n, ...) from every rank along dim 0 -> (W*n, ...), rank-major.

    Gradient flows back to every rank's `x` (the backward sums the gradients that all
    ranks' losses put on this rank's rows).
    """
    world, _ = world_info()
    if world == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate detached `x` (n, ...) from every rank along dim 0 -> (W*n, ...)."""
    world, _ = world_info()
    x = x.detach().contiguous()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


@torch.no_grad()
def sum_no_grad(x: Tensor) -> Tensor:
    """Element-wise sum of detached `x` over ranks (a copy; `x` is untouched)."""
    world, _ = world_info()
    x = x.detach().clone()
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def exchange_rows(x: Tensor) -> Tensor:
    """Send row block r of `x` to rank r; return what every rank sent to this one.

    x: (W*R, ...) where rows [r*R, (r+1)*R) are meant for rank r.
    Returns (W, R, ...): entry [s] is the block rank s computed for this rank.
    One all-to-all, so each rank receives only its own rows (W times less traffic than an
    all-gather followed by slicing).
    """
    world, _ = world_info()
    x = x.detach().contiguous()
    if x.shape[0] % world:
        raise ValueError(f"exchange_rows: {x.shape[0]} rows do not split over {world} ranks")
    if world == 1:
        return x.unsqueeze(0)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out.view(world, x.shape[0] // world, *x.shape[1:])


@torch.no_grad()
def mean_over_workers(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached mean over ranks of each scalar in `values` (for logging loss terms).

    Each rank's SSCQ loss terms are its own anchors' share; their mean over ranks is the
    loss of the global batch. One all-reduce for the whole dict.
    """
    world, _ = world_info()
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in keys])
    stacked = sum_no_grad(stacked) / world
    return {k: stacked[i] for i, k in enumerate(keys)}
