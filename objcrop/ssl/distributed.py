"""torch.distributed for pretraining: the set-up from what ``torchrun`` provides (or a single process),
the collectives the trainer needs, and the cross-rank pieces of the methods (gathering keys, MoCo's
shuffle-BN and its one-process emulation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "DistEnv",
    "all_reduce_flag",
    "all_reduce_mean",
    "batch_shuffle",
    "batch_unshuffle",
    "concat_all_gather",
    "init_distributed",
    "split_bn_forward",
    "world_size",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): nccl on GPUs,
    gloo on CPU. A plain ``python``/``objcrop`` launch is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def all_reduce_flag(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any rank (keeps ranks in lock-step on errors)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``values`` over the ranks (a NaN on any rank makes the mean NaN everywhere)."""
    if not env.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / env.world_size


def world_size() -> int:
    """Number of ranks, 1 outside an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from every rank along dim 0 (rank order); no gradient. Identity on one rank."""
    n = world_size()
    if n == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


@torch.no_grad()
def batch_shuffle(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """MoCo's shuffling BN: deals the global batch out to the ranks in a random order.

    All tensors share one permutation, drawn on rank 0 and broadcast. Each rank then encodes a
    batch drawn from every rank, so BatchNorm statistics cannot leak which key belongs to which
    query. With one process this is a no-op (BatchNorm over the whole batch ignores order).

    Returns:
        The shuffled tensors for this rank and the index that undoes the permutation (``None``
        with one process), for :func:`batch_unshuffle`. One process: see :func:`split_bn_forward`.
    """
    n = world_size()
    if n == 1:
        return list(tensors), None
    gathered = [concat_all_gather(t) for t in tensors]
    permutation = torch.randperm(gathered[0].shape[0], device=gathered[0].device)
    dist.broadcast(permutation, src=0)
    mine = permutation.view(n, -1)[dist.get_rank()]
    return [g[mine] for g in gathered], torch.argsort(permutation)


@torch.no_grad()
def batch_unshuffle(tensors: list[torch.Tensor], idx_unshuffle: torch.Tensor | None) -> list[torch.Tensor]:
    """Brings outputs computed on :func:`batch_shuffle` inputs back to this rank's original samples."""
    if idx_unshuffle is None:
        return list(tensors)
    mine = idx_unshuffle.view(world_size(), -1)[dist.get_rank()]
    return [concat_all_gather(t)[mine] for t in tensors]


def _cat_outputs(parts: list) -> object:
    """Concatenates per-group outputs: tensors, or (named) tuples and lists of them, field by field."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    fields = [_cat_outputs([p[i] for p in parts]) for i in range(len(first))]
    return type(first)(*fields) if hasattr(first, "_fields") else type(first)(fields)


def _take(outputs, index: torch.Tensor):
    if isinstance(outputs, torch.Tensor):
        return outputs[index]
    fields = [_take(o, index) for o in outputs]
    return type(outputs)(*fields) if hasattr(outputs, "_fields") else type(outputs)(fields)


@torch.no_grad()
def split_bn_forward(
    encoder: nn.Module, views: list[torch.Tensor], kinds: torch.Tensor, groups: int, min_group_size: int = 8
) -> list:
    """Shuffle-BN in one process: the key batch is shuffled and encoded in ``groups`` sub-batches.

    With several ranks, :func:`batch_shuffle` makes each key's BatchNorm statistics come from a random
    sub-batch that does not hold its query's sub-batch. In one process the whole key batch shares one
    set of statistics, which the positive key shares with its query's batch while the queued negatives
    do not: the network can find the positive from the statistics alone (MoCo's "BN leak"). Here each
    group is normalised with its own statistics, like the official single-GPU demo's SplitBatchNorm
    (which also averages the running statistics over groups; here each group updates them in turn, which
    only matters for a key encoder put in eval mode). Groups hold at least ``min_group_size`` samples:
    statistics of a handful of samples are mostly noise (MoCo's per-GPU batch is 32), so small batches
    get fewer groups, and a batch under twice that size is encoded whole.

    Args:
        encoder: Called as ``encoder(views, kinds)``; returns one output per view (tensors or tuples).
        views: ``V`` tensors ``[B, ...]``.
        kinds: ``[B, V]`` kind codes.
        groups: Number of groups (like the number of GPUs the shuffle emulates).
        min_group_size: Smallest group (at least 2: BatchNorm needs two samples in train mode).

    Returns:
        The encoder's outputs, in the original sample order.
    """
    n = kinds.shape[0]
    groups = min(int(groups), n // max(2, int(min_group_size)))
    if groups <= 1:
        return encoder(views, kinds)
    permutation = torch.randperm(n, device=kinds.device)
    parts = [encoder([v[idx] for v in views], kinds[idx]) for idx in torch.chunk(permutation, groups)]
    restore = torch.argsort(permutation)
    return [_take(_cat_outputs([p[j] for p in parts]), restore) for j in range(len(views))]
