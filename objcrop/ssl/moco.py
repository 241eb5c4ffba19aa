"""MoCo-v2 (Chen et al., 2020) with kind-routed projection heads, and the key queue DenseCL reuses.

The method meets the contract of :class:`~objcrop.ssl.base.SSLMethod`. In ``train()`` mode the forward
also pushes the new keys into the queue; in ``eval()`` mode it leaves the queue alone. The momentum
update of the key encoder runs in ``after_optimizer_step`` (:class:`~objcrop.ssl.momentum.MomentumEncoders`),
once after every optimizer step. Official MoCo updates at the start of ``forward`` instead; the sequence
of key-encoder weights is the same (the first update there is a no-op because both encoders start
equal), and updating after the step keeps gradient accumulation correct.

Under ``torch.distributed`` every rank must use the same per-rank batch size (keys and images are
gathered with ``all_gather``). Works with NCCL and with gloo on CPU. Every rank enqueues the same
gathered keys, so the queues stay equal without DDP's buffer broadcast (``broadcast_buffers=False``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from objcrop.ssl.backbones import build_backbone, convert_sync_batchnorm
from objcrop.ssl.distributed import batch_shuffle, batch_unshuffle, concat_all_gather, split_bn_forward, world_size
from objcrop.ssl.heads import KindRoutedHead, MLPHead, ViewEncoder, views_and_kinds
from objcrop.ssl.losses import contrastive_accuracy, contrastive_logits, info_nce_from_logits
from objcrop.ssl.momentum import MomentumEncoders, momentum_copy

__all__ = ["NEGATIVES", "KeyQueue", "MoCoV2"]


# What MoCoV2's ``negatives`` may be (see its docstring).
NEGATIVES = ("positive-head", "all")

# A logit far below any cosine / temperature: the softmax gives it no weight and no gradient.
_MASKED = -1e4


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
        shuffle_bn: Shuffle the key batch across ranks (:func:`~objcrop.ssl.distributed.batch_shuffle`). In
            one process with a queue, emulate it with ``split_bn_groups`` groups
            (:func:`~objcrop.ssl.distributed.split_bn_forward`).
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
        self.arch, self.small_images = backbone, small_images
        self.has_unused_parameters = separate_heads  # a batch may hold no view of one head's kind
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
