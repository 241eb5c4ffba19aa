"""BYOL (Grill et al., 2020) with kind-routed projectors.

The online network is backbone -> projector -> predictor; the target network is an EMA copy of
backbone -> projector whose decay ``tau`` rises from ``base_tau`` to 1 along a cosine
(:func:`objcrop.ssl.schedules.byol_tau`). With ``separate_heads`` the projector (online and target)
is routed by view kind; the predictor is shared. It meets the contract of
:class:`~objcrop.ssl.base.SSLMethod`. The paper trains it with :class:`~objcrop.ssl.lars.LARS`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from objcrop.ssl.backbones import build_backbone, convert_sync_batchnorm
from objcrop.ssl.base import SSLMethod
from objcrop.ssl.heads import KindRoutedHead, MLPHead, ViewEncoder, views_and_kinds
from objcrop.ssl.losses import byol_loss
from objcrop.ssl.momentum import ema_update_, momentum_copy
from objcrop.ssl.schedules import byol_tau

__all__ = ["BYOL"]


class BYOL(SSLMethod):
    """BYOL: online network with predictor, EMA target network, symmetric regression loss.

    Args:
        backbone: Backbone name (see :data:`objcrop.ssl.backbones.BACKBONES`).
        proj_hidden_dim: Hidden width of the projector.
        proj_dim: Output dimension of projector and predictor.
        pred_hidden_dim: Hidden width of the predictor.
        separate_heads: One projector for object views and one for context views.
        base_tau: Target decay at step 0.
        sync_bn: Convert every BatchNorm layer to SyncBatchNorm (BYOL's setting on many devices).
        small_images: CIFAR-style stem for 32-96 px inputs.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        separate_heads: bool = False,
        base_tau: float = 0.996,
        sync_bn: bool = False,
        small_images: bool = False,
    ) -> None:
        super().__init__()
        self.arch, self.small_images = backbone, small_images
        self.has_unused_parameters = separate_heads  # a batch may hold no view of one projector's kind
        trunk, feature_dim = build_backbone(backbone, small_images=small_images)
        projector = KindRoutedHead(
            lambda: MLPHead(feature_dim, proj_hidden_dim, proj_dim, batch_norm=True), separate=separate_heads
        )
        self.online = ViewEncoder(trunk, projector)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim, batch_norm=True)
        if sync_bn:
            self.online = convert_sync_batchnorm(self.online)
            self.predictor = convert_sync_batchnorm(self.predictor)
        self.target = momentum_copy(self.online)
        self.base_tau = base_tau

    @property
    def backbone(self) -> nn.Module:
        """The online backbone: the network kept for evaluation and transfer."""
        return self.online.backbone

    def update_target(self, step: int, total_steps: int) -> float:
        """EMA update of the target with ``tau = byol_tau(step, total_steps, base_tau)``; returns tau.

        ``step`` is the 0-based index of the optimizer step just taken.
        """
        tau = byol_tau(step, total_steps, self.base_tau)
        ema_update_(self.target, self.online, tau)
        return tau

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Trainer hook, once after each optimizer step: the target update."""
        return {"tau": self.update_target(step, total_steps)}

    def forward(self, batch) -> dict[str, torch.Tensor]:
        """Computes the symmetric BYOL loss of a two-view batch.

        The loss is the sum of both directions, ``byol_loss(p1, z2) + byol_loss(p2, z1)``, as in
        the paper, so it lies in ``[0, 8]``.

        Returns:
            ``loss`` and the detached mean cosine similarity ``cos_sim`` of predictions and targets.
        """
        views, kinds = views_and_kinds(batch)
        if len(views) != 2:
            raise ValueError(f"BYOL takes two views, got {len(views)}")
        projections = self.online(views, kinds)
        predictions = self.predictor(torch.cat(projections)).split(views[0].shape[0])
        with torch.no_grad():
            targets = self.target(views, kinds)
        loss_12 = byol_loss(predictions[0], targets[1])
        loss_21 = byol_loss(predictions[1], targets[0])
        loss = loss_12 + loss_21
        return {"loss": loss, "cos_sim": 1 - loss.detach() / 4}
