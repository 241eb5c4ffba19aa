"""LARS: layer-wise adaptive rate scaling (You et al., 2017), as used by BYOL.

BYOL's setting: ``lr = 0.2 x batch_size / 256`` (:func:`objcrop.ssl.schedules.scaled_lr`) with
warmup + cosine decay, weight decay 1.5e-6, momentum 0.9, trust coefficient 0.001, and biases and
BatchNorm parameters excluded from both the adaptation and the weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["LARS"]


class LARS(Optimizer):
    """SGD with momentum whose per-tensor step is scaled by the trust ratio.

    For a tensor ``w`` with gradient ``g``, step ``d = g + weight_decay * w``, then
    ``d *= trust_coefficient * ||w|| / ||d||`` (left as is when either norm is 0), then
    ``buf = momentum * buf + d`` and ``w -= lr * buf``.

    Tensors with at most one dimension (biases and normalisation weights) skip both the weight decay
    and the trust ratio when ``exclude_1d`` is true; a param group may set its own ``exclude_1d``.

    Args:
        params: Parameters or param groups.
        lr: Learning rate.
        momentum: Momentum factor.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        trust_coefficient: ``eta`` of the trust ratio.
        exclude_1d: Skip decay and adaptation for 1-d tensors.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        exclude_1d: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS setting: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "exclude_1d": exclude_1d,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not (group["exclude_1d"] and p.ndim <= 1):
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])
        return loss
