"""The classification loss of every evaluation head: the linear probes and the supervised baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from objcrop.evaluate.metrics import TASKS

__all__ = ["CLASS_REDUCTIONS", "classification_loss"]

CLASS_REDUCTIONS = ("sum", "mean")


def classification_loss(
    task: str, logits: torch.Tensor, targets: torch.Tensor, class_reduction: str = "sum"
) -> torch.Tensor:
    """Binary cross-entropy per class (``multi``) or cross-entropy (``single``), averaged over the images.

    ``class_reduction`` only matters for ``multi``, and the two callers differ on purpose:

    * ``"sum"`` (the linear probes): the per-class losses are summed. Each class is a logistic regression
      of its own, so its gradient does not shrink with the number of classes, and the probes' lr grid
      and the paper protocol's lr 30 mean the same on a 10-class and an 80-class dataset.
    * ``"mean"`` (the supervised baseline): averaged over the classes too, i.e. the sum divided by the
      number of classes. Adam is nearly blind to that constant, but the per-epoch losses the baseline
      reports and the weight of its weight decay are not, so changing it would change its results.

    Args:
        task: ``"multi"`` (``targets`` multi-hot float ``[B, C]``) or ``"single"`` (class indices ``[B]``).
        logits: ``[B, C]`` scores before the sigmoid or softmax.
        targets: The images' targets.
        class_reduction: ``"sum"`` or ``"mean"`` over the classes (``multi`` only).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if class_reduction not in CLASS_REDUCTIONS:
        raise ValueError(f"unknown class_reduction {class_reduction!r}; choose one of {', '.join(CLASS_REDUCTIONS)}")
    if task == "single":
        return F.cross_entropy(logits, targets)
    if class_reduction == "mean":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(targets)
