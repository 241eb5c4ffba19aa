"""Step-indexed schedules: linear warmup + cosine learning rate, BYOL's target decay, lr scaling."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["byol_tau", "cosine_schedule", "scaled_lr", "warmup_cosine", "warmup_cosine_lambda"]


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (held there afterwards)."""
    if total_steps <= 0:
        return end
    progress = min(max(step, 0), total_steps) / total_steps
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> float:
    """Learning-rate factor: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``final_factor``.

    The warmup counts from step 0 as ``(step + 1) / warmup_steps``, so the first step already trains.
    Multiply by the base lr, or use :func:`warmup_cosine_lambda` with ``torch.optim.lr_scheduler.LambdaLR``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, 1.0, final_factor)


def warmup_cosine_lambda(total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> Callable[[int], float]:
    """:func:`warmup_cosine` as a ``lr_lambda`` for ``LambdaLR`` (stepped once per optimizer step)."""
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, final_factor)

    return factor


def byol_tau(step: int, total_steps: int, base_tau: float = 0.996) -> float:
    """BYOL's target decay ``tau = 1 - (1 - base_tau) (cos(pi k / K) + 1) / 2``: ``base_tau`` at 0, 1 at ``K``."""
    return cosine_schedule(step, total_steps, base_tau, 1.0)


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """Linear scaling rule ``base_lr * batch_size / reference_batch`` (BYOL: 0.2 x B / 256 with LARS)."""
    return base_lr * batch_size / reference_batch
