"""MoCo-v2 (Chen et al., 2020) with kind-routed projection heads, plus the pieces DenseCL and BYOL reuse.

Interface shared by the methods, for the trainer:

* ``forward(batch) -> dict``: ``loss`` (with grad) and detached statistics. In ``train()`` mode the
  forward also pushes the new keys into the queue; in ``eval()`` mode it leaves the queue alone.
* ``after_optimizer_step(step, total_steps) -> dict``: the momentum (EMA) update of the key encoder,
  called once after every optimizer step. Official MoCo updates at the start of ``forward`` instead;
  the sequence of key-encoder weights is the same (the first update there is a no-op because both
  encoders start equal), and updating after the step keeps gradient accumulation correct.
* Only parameters with ``requires_grad`` belong in the optimizer: the key encoder has none.

Under ``torch.distributed`` every rank must use the same per-rank batch size (keys and images are
gathered with ``all_gather``). Works with NCCL and with gloo on CPU. Every rank enqueues the same
gathered keys, so the queues stay equal without DDP's buffer broadcast (``broadcast_buffers=False``).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from objcrop.ssl.backbones import build_backbone, convert_sync_batchnorm
from objcrop.ssl.heads import KindRoutedHead, MLPHead, ViewEncoder, views_and_kinds
from objcrop.ssl.losses import contrastive_accuracy, contrastive_logits, info_nce_from_logits

__all__ = [
    "NEGATIVES",
    "KeyQueue",
    "MoCoV2",
    "MomentumEncoders",
    "batch_shuffle",
    "batch_unshuffle",
    "concat_all_gather",
    "ema_update_",
    "momentum_copy",
    "split_bn_forward",
    "world_size",
]


# What MoCoV2's ``negatives`` may be (see its docstring).
NEGATIVES = ("positive-head", "all")

# A logit far below any cosine / temperature: the softmax gives it no weight and no gradient.
_MASKED = -1e4


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


def has_batch_norm(module: nn.Module) -> bool:
    """True when ``module`` holds a BatchNorm layer (SyncBatchNorm included)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


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


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module``, to be updated only by :func:`ema_update_`."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameter by parameter.

    Only parameters are averaged; each network keeps its own BatchNorm running statistics, as in
    the official MoCo and BYOL code.
    """
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks have different parameter lists")
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)


class KeyQueue(nn.Module):
    """A ring buffer of the latest ``size`` normalised keys, saved in the ``state_dict``.

    Args:
        size: Number of keys ``K``.
        dim: Key dimension ``C``.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, track_heads: bool = False) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        # The head each key came from (-1: the random initial keys, which count for every head).
        self.register_buffer("heads", torch.full((size,), -1, dtype=torch.long) if track_heads else None)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True, heads: torch.Tensor | None = None) -> None:
        """Overwrites the oldest entries with ``keys`` ``[N, C]`` (from every rank when ``gather``),
        and their head indices ``[N]`` when the queue tracks heads."""
        if gather:
            keys = concat_all_gather(keys)
            heads = None if heads is None else concat_all_gather(heads)
        size = self.keys.shape[0]
        keys = keys[-size:].to(self.keys.dtype)
        slots = (self.ptr + torch.arange(keys.shape[0], device=self.ptr.device)) % size
        self.keys[slots] = keys
        if self.heads is not None and heads is not None:
            self.heads[slots] = heads[-size:].to(self.heads.device)
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


class MomentumEncoders(nn.Module):
    """What MoCo-style methods share: a query encoder, its momentum (EMA) copy as key encoder, and the
    trainer hook that updates the copy. Subclasses set ``query_encoder``, ``key_encoder`` and ``momentum``."""

    query_encoder: nn.Module
    key_encoder: nn.Module
    momentum: float

    @property
    def backbone(self) -> nn.Module:
        """The query backbone: the network kept for evaluation and transfer."""
        return self.query_encoder.backbone

    def momentum_update(self) -> None:
        """Moves the key encoder toward the query encoder: ``k = m k + (1 - m) q``."""
        ema_update_(self.key_encoder, self.query_encoder, self.momentum)

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Trainer hook, once after each optimizer step: the momentum update."""
        self.momentum_update()
        return {"momentum": self.momentum}


class MoCoV2(MomentumEncoders):
    """MoCo-v2: query encoder, momentum key encoder and a queue of negative keys.

    Args:
        backbone: Backbone name (see :data:`objcrop.ssl.backbones.BACKBONES`).
        dim: Output dimension of the projection head.
        hidden_dim: Hidden width of the head; defaults to the backbone's feature dimension.
        queue_size: Number of negative keys ``K``. ``0`` drops the queue: each query's negatives are
            the other keys of the (global) batch, as in MoCo v3. It learns from the first steps, which
            matters for short runs, where a queue of keys from a random early encoder holds MoCo on its
            ``ln(K + 1)`` plateau.
        momentum: Key-encoder momentum ``m``.
        temperature: Softmax temperature.
        separate_heads: One head for object views and one for context views (see
            :class:`~objcrop.ssl.heads.KindRoutedHead`).
        shuffle_bn: Shuffle the key batch across ranks (:func:`batch_shuffle`). In one process with a
            queue, emulate it with ``split_bn_groups`` groups (:func:`split_bn_forward`).
        sync_bn: Convert the BatchNorm layers of both encoders to SyncBatchNorm (which makes
            ``shuffle_bn`` unnecessary: statistics then span the global batch anyway).
        symmetric: Also use view 2 as query and view 1 as key; the loss is the mean of both
            directions and both key batches enter the queue.
        small_images: CIFAR-style stem for 32-96 px inputs.
        split_bn_groups: Groups of the single-process shuffle-BN emulation (8 GPUs in the paper's
            setting); 1 turns it off. Only used with one process, a queue and BatchNorm in the key
            encoder: with in-batch negatives the positive and the negatives share statistics anyway.
        negatives: With separate heads, ``"positive-head"`` (default) contrasts each query only with
            negatives from its positive key's head, so the positive cannot be told apart by which head
            made it; ``"all"`` uses every key (the plain InfoNCE). Without separate heads both are the same.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        dim: int = 128,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        separate_heads: bool = False,
        shuffle_bn: bool = True,
        sync_bn: bool = False,
        symmetric: bool = False,
        small_images: bool = False,
        split_bn_groups: int = 8,
        negatives: str = "positive-head",
    ) -> None:
        super().__init__()
        if split_bn_groups < 1:
            raise ValueError(f"split_bn_groups must be >= 1, got {split_bn_groups}")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        trunk, feature_dim = build_backbone(backbone, small_images=small_images)
        hidden_dim = hidden_dim or feature_dim
        head = KindRoutedHead(lambda: MLPHead(feature_dim, hidden_dim, dim), separate=separate_heads)
        self.query_encoder = ViewEncoder(trunk, head)
        if sync_bn:
            self.query_encoder = convert_sync_batchnorm(self.query_encoder)
        self.key_encoder = momentum_copy(self.query_encoder)
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        # Masking by head only matters when there is more than one head.
        self.mask_by_head = separate_heads and negatives == "positive-head"
        self.queue = KeyQueue(queue_size, dim, track_heads=self.mask_by_head) if queue_size > 0 else None
        self.momentum = momentum
        self.temperature = temperature
        self.shuffle_bn = shuffle_bn
        self.split_bn_groups = int(split_bn_groups) if self.queue is not None and not sync_bn else 1
        self.symmetric = symmetric

    def dequeue_and_enqueue(self, keys: torch.Tensor, heads: torch.Tensor | None = None) -> None:
        """Pushes normalised keys ``[N, C]`` (and their head indices) from every rank into the queue
        (no-op without a queue)."""
        if self.queue is not None:
            self.queue.enqueue(keys, heads=heads)

    def _key_heads(self, kinds: torch.Tensor) -> torch.Tensor:
        return self.key_encoder.head.head_index(kinds)

    def _in_batch_loss(
        self, queries: list[torch.Tensor], keys: list[torch.Tensor], heads: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """InfoNCE against the keys of the global batch: the positive of row ``i`` is key ``i``. With
        ``mask_by_head``, keys from another head than row ``i``'s positive are left out."""
        rank = dist.get_rank() if world_size() > 1 else 0
        losses, positives, negatives, hits = [], [], [], []
        for q, k, h in zip(queries, keys, heads, strict=True):
            all_keys = concat_all_gather(k).float()
            logits = q.float() @ all_keys.t()
            labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
            valid = torch.ones_like(logits, dtype=torch.bool)
            if self.mask_by_head:
                valid = concat_all_gather(h)[None, :] == h[:, None]
                logits = logits.masked_fill(~valid, _MASKED)
            losses.append(F.cross_entropy(logits / self.temperature, labels))
            with torch.no_grad():
                is_positive = F.one_hot(labels, logits.shape[1]).bool()
                positives.append(logits[is_positive])
                negatives.append(logits[~is_positive & valid])
                hits.append((logits.argmax(dim=1) == labels).float())
        return {
            "loss": torch.stack(losses).mean(),
            "acc1": torch.cat(hits).mean(),
            "pos_sim": torch.cat(positives).mean(),
            "neg_sim": torch.cat(negatives).mean(),
        }

    @torch.no_grad()
    def encode_keys(self, views: list[torch.Tensor], kinds: torch.Tensor) -> list[torch.Tensor]:
        """Normalised key embeddings of ``views`` (``kinds`` ``[B, V]``), shuffling BN across ranks if set."""
        if not self.shuffle_bn:
            return [F.normalize(k, dim=1) for k in self.key_encoder(views, kinds)]
        if world_size() == 1:
            keys = split_bn_forward(self.key_encoder, views, kinds, self.split_bn_groups)
            return [F.normalize(k, dim=1) for k in keys]
        shuffled, idx_unshuffle = batch_shuffle([*views, kinds])
        keys = self.key_encoder(shuffled[:-1], shuffled[-1])
        return [F.normalize(k, dim=1) for k in batch_unshuffle(keys, idx_unshuffle)]

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """Computes the contrastive loss of a two-view batch (see :func:`~objcrop.ssl.heads.views_and_kinds`).

        Returns:
            ``loss``; detached ``acc1`` (positive ranked first), ``pos_sim`` and ``neg_sim``
            (mean cosine similarity to the positive and to the negatives).
        """
        views, kinds = views_and_kinds(batch)
        if len(views) != 2:
            raise ValueError(f"MoCo-v2 takes two views, got {len(views)}")
        query_views, key_views = ([0, 1], [1, 0]) if self.symmetric else ([0], [1])
        queries = self.query_encoder([views[i] for i in query_views], kinds[:, query_views])
        queries = [F.normalize(q, dim=1) for q in queries]
        keys = self.encode_keys([views[i] for i in key_views], kinds[:, key_views])
        heads = [self._key_heads(kinds[:, i]) for i in key_views]
        if self.queue is None:
            return self._in_batch_loss(queries, keys, heads)
        # The clone keeps the negatives the loss saw intact for backward once new keys are enqueued.
        negatives = self.queue.keys.clone()
        logits = [contrastive_logits(q, k, negatives) for q, k in zip(queries, keys, strict=True)]
        valid = [torch.ones_like(lg, dtype=torch.bool) for lg in logits]
        if self.mask_by_head:
            queued = self.queue.heads.clone()
            for i, h in enumerate(heads):
                same = (queued[None, :] == h[:, None]) | (queued[None, :] < 0)
                valid[i] = torch.cat([torch.ones_like(same[:, :1]), same], dim=1)
                logits[i] = logits[i].masked_fill(~valid[i], _MASKED)
        loss = torch.stack([info_nce_from_logits(lg, self.temperature) for lg in logits]).mean()
        if self.training:
            self.dequeue_and_enqueue(torch.cat(keys), torch.cat(heads) if self.mask_by_head else None)
        logits_all, valid_all = torch.cat(logits).detach(), torch.cat(valid)
        return {
            "loss": loss,
            "acc1": contrastive_accuracy(logits_all),
            "pos_sim": logits_all[:, 0].mean(),
            "neg_sim": logits_all[:, 1:][valid_all[:, 1:]].mean(),
        }
