"""DenseCL (Wang et al., 2021): MoCo-v2 plus a dense contrastive loss on the C5 feature map.

Each encoder has a global head (average pool + MLP, as MoCo-v2) and a dense head (1x1-conv MLP at
every C5 location). Query locations are matched to key locations by the cosine similarity of the
backbone features; each match is a positive, and a second queue holds the dense negatives: one
average-pooled key-grid vector per sample, as in the paper (``dense_queue="pooled"``), or every
key location (``"locations"``). It meets the contract of :class:`~objcrop.ssl.base.SSLMethod`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from objcrop.ssl.backbones import build_backbone, convert_sync_batchnorm
from objcrop.ssl.distributed import batch_shuffle, batch_unshuffle, split_bn_forward, world_size
from objcrop.ssl.heads import ConvMLPHead, KindRoutedHead, MLPHead, views_and_kinds
from objcrop.ssl.losses import (
    contrastive_accuracy,
    contrastive_logits,
    densecl_dense_loss,
    densecl_loss,
    info_nce_from_logits,
)
from objcrop.ssl.moco import KeyQueue
from objcrop.ssl.momentum import MomentumEncoders, momentum_copy

__all__ = ["DENSE_QUEUES", "DenseCL", "DenseEncoder", "DenseOutput"]

DENSE_QUEUES = ("pooled", "locations")


class DenseOutput(NamedTuple):
    """Outputs of :class:`DenseEncoder` for one view."""

    features: torch.Tensor  # [B, D, h, w] backbone C5 map
    embedding: torch.Tensor  # [B, dim] global head output
    grid: torch.Tensor  # [B, dim, h, w] dense head output


class DenseEncoder(nn.Module):
    """C5 backbone with a global and a dense head, both routed by view kind.

    Args:
        backbone: Trunk returning the C5 map (``build_backbone(..., feature_map=True)``).
        global_head: Head on the average-pooled map.
        dense_head: Head applied at every location of the map.
    """

    def __init__(self, backbone: nn.Module, global_head: KindRoutedHead, dense_head: KindRoutedHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.global_head = global_head
        self.dense_head = dense_head

    def forward(self, views: Sequence[torch.Tensor], kinds: torch.Tensor) -> list[DenseOutput]:
        """Encodes ``V`` views (``kinds`` ``[B, V]``); the heads run once over all views."""
        maps = [self.backbone(v) for v in views]
        features = torch.cat(maps)
        flat_kinds = kinds.t().reshape(-1)
        embeddings = self.global_head(features.mean(dim=(2, 3)), flat_kinds)
        grids = self.dense_head(features, flat_kinds)
        size = views[0].shape[0]
        return [DenseOutput(*parts) for parts in zip(maps, embeddings.split(size), grids.split(size), strict=True)]


class DenseCL(MomentumEncoders):
    """DenseCL: global InfoNCE + dense InfoNCE, ``loss = (1 - lambda) global + lambda dense``.

    Args:
        backbone: Backbone name (see :data:`objcrop.ssl.backbones.BACKBONES`).
        dim: Output dimension of both heads.
        hidden_dim: Hidden width of both heads; defaults to the backbone's feature dimension.
        queue_size: Number of global negatives.
        dense_queue_size: Number of dense negatives; defaults to ``queue_size``.
        dense_queue: ``"pooled"`` (one averaged key-grid vector per sample, the paper) or
            ``"locations"`` (every key location).
        momentum: Key-encoder momentum.
        temperature: Softmax temperature of both losses.
        lambda_: Weight of the dense loss.
        separate_heads: One global and one dense head for object views, another pair for context views.
        shuffle_bn: Shuffle the key batch across ranks.
        sync_bn: Convert every BatchNorm layer to SyncBatchNorm.
        symmetric: Also use view 2 as query and view 1 as key (mean of both directions).
        small_images: CIFAR-style stem for 32-96 px inputs.
        split_bn_groups: Groups of the single-process shuffle-BN emulation for the queues
            (:func:`~objcrop.ssl.distributed.split_bn_forward`); 1 turns it off.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        dim: int = 128,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        dense_queue_size: int | None = None,
        dense_queue: str = "pooled",
        momentum: float = 0.999,
        temperature: float = 0.2,
        lambda_: float = 0.5,
        separate_heads: bool = False,
        shuffle_bn: bool = True,
        sync_bn: bool = False,
        symmetric: bool = False,
        small_images: bool = False,
        split_bn_groups: int = 8,
    ) -> None:
        super().__init__()
        if split_bn_groups < 1:
            raise ValueError(f"split_bn_groups must be >= 1, got {split_bn_groups}")
        if dense_queue not in DENSE_QUEUES:
            raise ValueError(f"dense_queue must be one of {DENSE_QUEUES}, got {dense_queue!r}")
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda_ must lie in [0, 1], got {lambda_}")
        self.arch, self.small_images = backbone, small_images
        self.has_unused_parameters = separate_heads  # a batch may hold no view of one head pair's kind
        trunk, feature_dim = build_backbone(backbone, small_images=small_images, feature_map=True)
        hidden_dim = hidden_dim or feature_dim
        self.query_encoder = DenseEncoder(
            trunk,
            KindRoutedHead(lambda: MLPHead(feature_dim, hidden_dim, dim), separate=separate_heads),
            KindRoutedHead(lambda: ConvMLPHead(feature_dim, hidden_dim, dim), separate=separate_heads),
        )
        if sync_bn:
            self.query_encoder = convert_sync_batchnorm(self.query_encoder)
        self.key_encoder = momentum_copy(self.query_encoder)
        self.queue = KeyQueue(queue_size, dim)
        self.dense_queue = KeyQueue(dense_queue_size or queue_size, dim)
        self.dense_queue_mode = dense_queue
        self.momentum = momentum
        self.temperature = temperature
        self.lambda_ = lambda_
        self.shuffle_bn = shuffle_bn
        self.split_bn_groups = 1 if sync_bn else int(split_bn_groups)
        self.symmetric = symmetric

    @torch.no_grad()
    def encode_keys(self, views: list[torch.Tensor], kinds: torch.Tensor) -> list[DenseOutput]:
        """Key-encoder outputs of ``views`` (``kinds`` ``[B, V]``), shuffling BN across ranks if set."""
        if not self.shuffle_bn:
            return self.key_encoder(views, kinds)
        if world_size() == 1:
            return split_bn_forward(self.key_encoder, views, kinds, self.split_bn_groups)
        shuffled, idx_unshuffle = batch_shuffle([*views, kinds])
        outputs = self.key_encoder(shuffled[:-1], shuffled[-1])
        return [DenseOutput(*batch_unshuffle(list(out), idx_unshuffle)) for out in outputs]

    def _dense_keys(self, grid: torch.Tensor) -> torch.Tensor:
        """Normalised dense negatives to enqueue from a raw key grid ``[B, dim, h, w]``."""
        if self.dense_queue_mode == "pooled":
            return F.normalize(grid.mean(dim=(2, 3)), dim=1)
        return F.normalize(grid.flatten(2).transpose(1, 2).reshape(-1, grid.shape[1]), dim=1)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """Computes the DenseCL loss of a two-view batch.

        Returns:
            ``loss``; detached ``loss_global``, ``loss_dense`` and ``acc1`` (global positive ranked first).
        """
        views, kinds = views_and_kinds(batch)
        if len(views) != 2:
            raise ValueError(f"DenseCL takes two views, got {len(views)}")
        query_views, key_views = ([0, 1], [1, 0]) if self.symmetric else ([0], [1])
        queries = self.query_encoder([views[i] for i in query_views], kinds[:, query_views])
        keys = self.encode_keys([views[i] for i in key_views], kinds[:, key_views])
        negatives, dense_negatives = self.queue.keys.clone(), self.dense_queue.keys.clone()

        global_losses, dense_losses, logits = [], [], []
        for q, k in zip(queries, keys, strict=True):
            lg = contrastive_logits(F.normalize(q.embedding, dim=1), F.normalize(k.embedding, dim=1), negatives)
            logits.append(lg.detach())
            global_losses.append(info_nce_from_logits(lg, self.temperature))
            dense_losses.append(
                densecl_dense_loss(
                    F.normalize(q.grid, dim=1),
                    F.normalize(k.grid, dim=1),
                    q.features,
                    k.features,
                    dense_negatives,
                    self.temperature,
                )
            )
        loss_global = torch.stack(global_losses).mean()
        loss_dense = torch.stack(dense_losses).mean()
        if self.training:
            self.queue.enqueue(torch.cat([F.normalize(k.embedding, dim=1) for k in keys]))
            self.dense_queue.enqueue(torch.cat([self._dense_keys(k.grid) for k in keys]))
        return {
            "loss": densecl_loss(loss_global, loss_dense, self.lambda_),
            "loss_global": loss_global.detach(),
            "loss_dense": loss_dense.detach(),
            "acc1": contrastive_accuracy(torch.cat(logits)),
        }
