"""The ``cached`` linear probe: a linear classifier fitted on cached frozen features.

Features are extracted once at the read-out resolution and cached (:mod:`objcrop.evaluate.features`);
a linear classifier on standardised features is trained with SGD for each (lr, weight decay) of a grid
on a seeded train/val split of the train split; the best on val is retrained on the whole train split
and scored on test. Test never takes part in the choice.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from objcrop.data.records import Records
from objcrop.evaluate.features import cached_split_features, valid_rows
from objcrop.evaluate.linear import DEFAULT_LRS, DEFAULT_WDS, LinearResult
from objcrop.evaluate.losses import classification_loss
from objcrop.evaluate.metrics import chance_level, labels_for_task, metric_name, score_predictions

__all__ = [
    "LinearClassifier",
    "as_targets",
    "cached_linear_probe",
    "evaluate_linear",
    "fit_linear",
    "num_classes_of",
    "predict",
    "split_train_val",
    "train_linear",
]

logger = logging.getLogger(__name__)


class LinearClassifier(nn.Module):
    """``(x - mean) / std`` followed by one linear layer; the statistics are fixed buffers."""

    def __init__(self, dim: int, num_classes: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.float().clone())
        self.register_buffer("std", torch.ones(dim) if std is None else std.float().clone())
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x.float() - self.mean) / self.std)


def as_targets(task: str, y: np.ndarray) -> torch.Tensor:
    """Targets as the loss wants them: float32 multi-hot for ``multi``, int64 indices for ``single``."""
    return torch.as_tensor(np.asarray(y), dtype=torch.float32 if task == "multi" else torch.int64)


def num_classes_of(task: str, *labels: np.ndarray) -> int:
    """The number of classes the targets imply: the width for ``multi``, the largest index + 1 for ``single``."""
    if task == "multi":
        return int(np.asarray(labels[0]).shape[1])
    return int(max(int(np.max(y)) for y in labels if len(y)) + 1)


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    task: str,
    lr: float,
    weight_decay: float,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearClassifier:
    """Trains a :class:`LinearClassifier` on features ``x``: SGD (momentum 0.9, Nesterov), cosine lr, mini-batches.

    Args:
        x: ``[N, D]`` features (any float dtype; NaN rows must be removed first).
        y: Multi-hot ``[N, C]`` (``multi``) or class indices ``[N]`` (``single``).
        task: ``"multi"`` (binary cross-entropy) or ``"single"`` (cross-entropy).
        lr: Peak learning rate.
        weight_decay: L2 penalty on the weights.
        epochs: Passes over ``x``.
        batch_size: Images per step.
        seed: Seed of the batch order.
        num_classes: Number of classes for ``single`` (defaults to ``max(y) + 1``).
    """
    xs = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    ys = as_targets(task, y)
    classes = num_classes if num_classes is not None else num_classes_of(task, np.asarray(y))
    model = LinearClassifier(xs.shape[1], classes, xs.mean(0), xs.std(0).clamp_min(1e-6))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(xs) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(batch_size):
            loss = classification_loss(task, model(xs[idx]), ys[idx], class_reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Logits ``[N, C]`` of ``model`` on features ``x``."""
    xs = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return torch.cat([model(chunk) for chunk in xs.split(batch_size)]).numpy() if len(xs) else np.zeros((0, 0))


def evaluate_linear(model: nn.Module, x: np.ndarray, y: np.ndarray, task: str) -> tuple[float, int, int]:
    """The task's metric of ``model`` on features ``x`` with targets ``y``: ``(percent, evaluated, skipped)``."""
    return score_predictions(task, y, predict(model, x))


def train_linear(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    task: str,
    lrs: Sequence[float] = DEFAULT_LRS,
    wds: Sequence[float] = DEFAULT_WDS,
    epochs: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    num_classes: int | None = None,
) -> tuple[LinearClassifier, dict]:
    """Grid search of lr and weight decay: fits on ``train``, scores on ``val``, keeps the best.

    Ties go to the earlier grid point (smaller lr, then smaller weight decay, in the given order).

    Returns:
        The model trained on ``train_x`` with the best values, and ``{"lr", "weight_decay", "val_value",
        "grid": [{"lr", "weight_decay", "val_value"}, ...]}``.
    """
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError(f"train ({len(train_x)}) and val ({len(val_x)}) splits must both be non-empty")
    best: tuple[float, LinearClassifier, dict] | None = None
    grid = []
    for lr in lrs:
        for wd in wds:
            model = fit_linear(train_x, train_y, task, lr, wd, epochs, batch_size, seed, num_classes)
            value, _, _ = evaluate_linear(model, val_x, val_y, task)
            point = {"lr": float(lr), "weight_decay": float(wd), "val_value": value}
            grid.append(point)
            logger.debug("linear probe lr=%g wd=%g: val %.2f", lr, wd, value)
            score = -math.inf if math.isnan(value) else value
            if best is None or score > best[0]:
                best = (score, model, point)
    if best is None:
        raise ValueError("the lr and weight-decay grids must not be empty")
    _, model, point = best
    return model, {**point, "grid": grid}


def split_train_val(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into sorted train and val indices (val at least 1 image)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 training images to carve a validation split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def cached_linear_probe(
    spec: str | os.PathLike,
    train_records: Records,
    test_records: Records,
    task: str = "multi",
    size: int = 128,
    cache_dir: str | os.PathLike | None = None,
    arch: str | None = None,
    small_images: bool | None = None,
    seed: int = 0,
    mode: str = "center",
    lrs: Sequence[float] = DEFAULT_LRS,
    wds: Sequence[float] = DEFAULT_WDS,
    epochs: int = 100,
    batch_size: int = 256,
    val_fraction: float = 0.2,
    feature_batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LinearResult:
    """The ``cached`` protocol of :func:`objcrop.evaluate.linear.linear_probe` (same arguments, see there)."""
    train_y, test_y = labels_for_task(train_records, task), labels_for_task(test_records, task)
    start = time.perf_counter()
    train_x, test_x, cache_hits = cached_split_features(
        spec,
        train_records,
        test_records,
        size,
        cache_dir=cache_dir,
        arch=arch,
        small_images=small_images,
        seed=seed,
        mode=mode,
        batch_size=feature_batch_size,
        workers=workers,
        device=device,
        progress=progress,
    )
    seconds_features = time.perf_counter() - start

    train_ok, test_ok = valid_rows(train_x), valid_rows(test_x)
    skipped = int((~train_ok).sum() + (~test_ok).sum())
    train_x, train_y, test_x, test_y = train_x[train_ok], train_y[train_ok], test_x[test_ok], test_y[test_ok]

    start = time.perf_counter()
    fit_idx, val_idx = split_train_val(len(train_x), val_fraction, seed)
    _, chosen = train_linear(
        train_x[fit_idx],
        train_y[fit_idx],
        train_x[val_idx],
        train_y[val_idx],
        task,
        lrs=lrs,
        wds=wds,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        num_classes=train_records.num_classes,
    )
    model = fit_linear(
        train_x,
        train_y,
        task,
        chosen["lr"],
        chosen["weight_decay"],
        epochs,
        batch_size,
        seed,
        train_records.num_classes,
    )
    value, evaluated, skipped_classes = evaluate_linear(model, test_x, test_y, task)
    seconds_train = time.perf_counter() - start
    return LinearResult(
        metric=metric_name(task),
        value=value,
        classes_evaluated=evaluated,
        classes_skipped=skipped_classes,
        chance=chance_level(task, test_y),
        task=task,
        protocol="cached",
        backbone=os.fspath(spec),
        size=size,
        train_images=len(train_x),
        test_images=len(test_x),
        images_skipped=skipped,
        feature_dim=int(train_x.shape[1]),
        lr=chosen["lr"],
        weight_decay=chosen["weight_decay"],
        epochs=epochs,
        val_value=chosen["val_value"],
        seconds_features=seconds_features,
        seconds_train=seconds_train,
        cache_hits=cache_hits,
        grid=chosen["grid"],
    )
