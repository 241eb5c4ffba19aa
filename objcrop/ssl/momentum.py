"""Momentum (EMA) encoders: the frozen copy, its update, and the base of MoCo-style methods.

As solo-learn's ``utils/momentum.py`` and ``BaseMomentumMethod``: MoCo-v2 and DenseCL derive from
:class:`MomentumEncoders`; BYOL, whose decay follows a schedule, uses :func:`momentum_copy` and
:func:`ema_update_` directly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from objcrop.ssl.base import SSLMethod

__all__ = ["MomentumEncoders", "ema_update_", "momentum_copy"]


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


class MomentumEncoders(SSLMethod):
    """What MoCo-style methods share: a query encoder, its momentum (EMA) copy as key encoder, and the
    trainer hook that updates the copy. Subclasses set ``query_encoder``, ``key_encoder`` and ``momentum``
    (and the attributes :class:`~objcrop.ssl.base.SSLMethod` declares)."""

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
