"""The contract every self-supervised method meets, and the one way to build a method from a config.

A method is an ``nn.Module`` that holds its networks and its loss; the trainer owns everything else
(the loop, devices, precision, optimizer, checkpoints, logs). Per optimizer step the trainer calls::

    out = method(batch)            # {"loss": tensor with grad, ...detached scalar statistics}
    out["loss"].backward(); optimizer.step()
    method.after_optimizer_step(step, total_steps)   # momentum / EMA updates; returns numbers to log

The optimizer gets the parameters that require grad (a momentum encoder has none). Export and
evaluation keep :attr:`SSLMethod.backbone` and read the declared attributes instead of the
constructor's arguments.

Adding a method: a module with a subclass of :class:`SSLMethod` (see :class:`~objcrop.ssl.byol.BYOL`,
the shortest), its line in :data:`objcrop.registry.METHODS`, and a YAML config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["SSLMethod", "build_method"]


class SSLMethod(nn.Module, ABC):
    """Base class of MoCo-v2, BYOL and DenseCL (and of any method the trainer runs).

    A subclass sets the three declared attributes in its constructor.

    Attributes:
        arch: The backbone's name as :func:`~objcrop.ssl.backbones.build_backbone` takes it (``resnet50``,
            ``timm:<name>``); exports record it next to the weights.
        small_images: Whether the backbone has the small-image stem (3x3 convolution, no max-pool).
        has_unused_parameters: Whether a step may leave trainable parameters without a gradient (with
            separate heads, a batch may hold no view of one head's kind): DDP then needs
            ``find_unused_parameters``.
    """

    arch: str
    small_images: bool
    has_unused_parameters: bool

    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The network kept for evaluation and transfer (the online / query backbone)."""

    @abstractmethod
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """The loss of a batch ``{"views": [x1, x2], "kinds": [B, 2]}`` (see
        :func:`~objcrop.ssl.heads.views_and_kinds`).

        Returns:
            ``loss`` (a scalar with grad) and any detached scalar statistics to log (``acc1``, ...).
        """

    @abstractmethod
    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Called once after every optimizer step (``step`` counts from 0) for momentum or EMA updates.

        Returns:
            Numbers to log with the step (e.g. ``{"momentum": 0.99}``); ``{}`` for none.
        """


def build_method(config: Mapping[str, Any]) -> SSLMethod:
    """The method a (validated) pretraining config's ``method`` section names, built on the current
    default device (``with torch.device("meta")`` builds the structure only)."""
    from objcrop.ssl.config import method_class

    kwargs = dict(config["method"])
    return method_class(kwargs.pop("name"))(**kwargs)
