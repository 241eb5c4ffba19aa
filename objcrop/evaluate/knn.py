"""Weighted k-nearest-neighbour evaluation on frozen features (InstDisc / DINO style), and a monitor
the trainer can call during pretraining.

Features are L2-normalised; each of the ``k`` most cosine-similar training images votes for its
labels with weight ``exp(sim / T)``. A class's score is its share of the total vote of the ``k``
neighbours (in ``[0, 1]``, so scores are comparable across test images, which average precision
needs; the top-1 class is the same as with the raw sum). Single-label: top-1 accuracy of the highest
score. Multi-label: the scores rank the test images per class and give mAP. Percentages throughout.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from objcrop.data.records import Records
from objcrop.evaluate.features import cached_split_features, extract_features, valid_rows
from objcrop.evaluate.metrics import TASKS, check_same_classes, labels_for_task, metric_name, score_predictions

__all__ = ["KNNMonitor", "KNNProbeResult", "KNNResult", "knn_evaluate", "knn_probe", "knn_scores"]

logger = logging.getLogger(__name__)


@dataclass
class KNNResult:
    """The kNN metric for one ``k``; ``value`` is a percentage."""

    k: int
    metric: str
    value: float
    classes_evaluated: int
    classes_skipped: int
    temperature: float

    def to_dict(self) -> dict:
        return asdict(self)


def _one_hot(task: str, labels: np.ndarray, num_classes: int | None) -> torch.Tensor:
    labels = np.asarray(labels)
    if task == "multi":
        return torch.as_tensor(labels, dtype=torch.float32)
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    return F.one_hot(torch.as_tensor(labels, dtype=torch.int64), classes).float()


@torch.no_grad()
def knn_scores(
    train_feats: np.ndarray | torch.Tensor,
    train_targets: torch.Tensor,
    test_feats: np.ndarray | torch.Tensor,
    k: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Class scores ``[M, C]`` of each test image: the normalised ``exp(sim / T)``-weighted vote of its ``k``
    nearest training images (cosine similarity).

    Args:
        train_feats: ``[N, D]`` training features.
        train_targets: ``[N, C]`` float multi-hot (or one-hot) training targets.
        test_feats: ``[M, D]`` test features.
        k: Number of neighbours (capped at ``N``).
        temperature: ``T`` of the weights.
        chunk: Test images per similarity block (bounds the memory to ``chunk x N``).
    """
    train = F.normalize(torch.as_tensor(np.asarray(train_feats, dtype=np.float32)), dim=1)
    test = F.normalize(torch.as_tensor(np.asarray(test_feats, dtype=np.float32)), dim=1)
    k = min(int(k), len(train))
    if k < 1:
        raise ValueError("kNN needs at least one training image and k >= 1")
    out = []
    for block in test.split(chunk):
        sims, idx = (block @ train.T).topk(k, dim=1)
        # exp((s - max) / T) / sum: the same weights as exp(s / T), without overflow for small T.
        weights = torch.softmax(sims / temperature, dim=1)
        out.append(torch.einsum("mk,mkc->mc", weights, train_targets[idx]))
    return torch.cat(out).numpy() if out else np.zeros((0, train_targets.shape[1]), np.float32)


def knn_evaluate(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    k: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    task: str = "multi",
    num_classes: int | None = None,
) -> list[KNNResult]:
    """Weighted kNN metric for each ``k``.

    Rows with NaN features (unreadable images) are left out of both sides.

    Args:
        train_feats: ``[N, D]`` training features.
        train_labels: Multi-hot ``[N, C]`` (``multi``) or class indices ``[N]`` (``single``).
        test_feats: ``[M, D]`` test features.
        test_labels: Same form as ``train_labels``.
        k: Neighbour counts to evaluate.
        temperature: ``T`` of the weights ``exp(sim / T)``.
        task: ``"multi"`` (mAP) or ``"single"`` (top-1).
        num_classes: Number of classes for ``single`` (defaults to the largest label + 1).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    train_ok, test_ok = valid_rows(np.asarray(train_feats)), valid_rows(np.asarray(test_feats))
    train_labels, test_labels = np.asarray(train_labels)[train_ok], np.asarray(test_labels)[test_ok]
    if task == "single" and num_classes is None:
        num_classes = int(max(train_labels.max(initial=0), test_labels.max(initial=0))) + 1
    targets = _one_hot(task, train_labels, num_classes)
    results = []
    for kk in k:
        scores = knn_scores(
            np.asarray(train_feats)[train_ok], targets, np.asarray(test_feats)[test_ok], kk, temperature
        )
        value, evaluated, skipped = score_predictions(task, test_labels, scores)
        results.append(KNNResult(int(kk), metric_name(task), value, evaluated, skipped, float(temperature)))
    return results


@dataclass
class KNNProbeResult:
    """Outcome of :func:`knn_probe`: one :class:`KNNResult` per ``k``, the first being the headline, and the
    images scored: ``train_images`` and ``test_images`` were read, ``images_skipped`` (of both splits) were
    not and are left out."""

    results: list[KNNResult]
    train_images: int = 0
    test_images: int = 0
    images_skipped: int = 0

    def to_dict(self) -> dict:
        """The headline's fields, in the same shape as :meth:`LinearResult.to_dict`, the image counts, and
        ``results``."""
        counts = {"train_images": self.train_images, "test_images": self.test_images}
        return {
            **self.results[0].to_dict(),
            **counts,
            "images_skipped": self.images_skipped,
            "results": [r.to_dict() for r in self.results],
        }


def knn_probe(
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
    k: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    feature_batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> KNNProbeResult:
    """Weighted kNN of the backbone ``spec`` on a train/test pair of datasets, on the features that
    :func:`~objcrop.evaluate.linear.linear_probe` caches (the two share the cache).

    Args:
        spec: Backbone (see :func:`objcrop.evaluate.backbone.load_backbone`).
        train_records: Images whose features vote.
        test_records: Images scored.
        task: ``"multi"`` (mAP) or ``"single"`` (top-1).
        size: Read-out side in pixels.
        cache_dir: Feature cache folder; defaults to one next to the weights.
        arch: Architecture of a plain state dict.
        small_images: Small-image stem of a plain state dict or random init.
        seed: Seed of random weights.
        mode: Read-out geometry (``center`` or ``squash``).
        k: Neighbour counts (the first is the headline of :meth:`KNNProbeResult.to_dict`).
        temperature: ``T`` of the weights ``exp(sim / T)``.
        feature_batch_size: Images per forward pass when extracting features.
        workers: DataLoader worker processes.
        device: Where the backbone runs.
        progress: Show progress bars.

    Raises:
        ValueError: The splits have different classes, ``k`` is empty, or the task does not fit the labels.
    """
    if not len(k):
        raise ValueError("give at least one k")
    check_same_classes(train_records, test_records)
    train_y, test_y = labels_for_task(train_records, task), labels_for_task(test_records, task)
    train_x, test_x, _ = cached_split_features(
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
    results = knn_evaluate(
        train_x,
        train_y,
        test_x,
        test_y,
        k=k,
        temperature=temperature,
        task=task,
        num_classes=train_records.num_classes,
    )
    train_ok, test_ok = int(valid_rows(train_x).sum()), int(valid_rows(test_x).sum())
    skipped = len(train_x) - train_ok + len(test_x) - test_ok
    return KNNProbeResult(results, train_images=train_ok, test_images=test_ok, images_skipped=skipped)


class KNNMonitor:
    """kNN metric of a backbone on fixed small train/test subsets, cheap enough to run every few epochs.

    Example (in a training loop, on the main process)::

        monitor = KNNMonitor(train_records, test_records, size=64, max_train=1000, max_test=500)
        ...
        if epoch % monitor.every_epochs == 0:
            stats.update(monitor(method.backbone))  # {"knn_map@20": ...}

    Args:
        train_records: Images whose features vote (a seeded subset of at most ``max_train``).
        test_records: Images scored (a seeded subset of at most ``max_test``).
        size: Read-out side in pixels.
        task: ``"multi"`` or ``"single"``.
        k: Neighbour counts.
        temperature: ``T`` of the weights.
        max_train: Largest training subset.
        max_test: Largest test subset.
        every_epochs: How often the caller is meant to run it (kept for the caller's use).
        batch_size: Images per forward pass.
        workers: DataLoader worker processes.
        seed: Seed of the subsets.
    """

    def __init__(
        self,
        train_records: Records,
        test_records: Records,
        size: int = 64,
        task: str = "multi",
        k: Sequence[int] = (20,),
        temperature: float = 0.07,
        max_train: int = 1000,
        max_test: int = 500,
        every_epochs: int = 1,
        batch_size: int = 128,
        workers: int = 0,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.train = _subset(train_records, max_train, rng)
        self.test = _subset(test_records, max_test, rng)
        self.train_labels = labels_for_task(self.train, task)
        self.test_labels = labels_for_task(self.test, task)
        self.num_classes = train_records.num_classes
        self.size, self.task, self.k, self.temperature = size, task, tuple(k), temperature
        self.every_epochs, self.batch_size, self.workers = every_epochs, batch_size, workers

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """Evaluates ``backbone`` (run on its own device, its train/eval mode restored afterwards).

        Returns:
            ``{"knn_<metric>@<k>": value}`` for each ``k``, e.g. ``{"knn_map@20": 31.2}``, and
            ``knn_images_skipped``: the images of both subsets that could not be read (left out).
        """
        train = extract_features(backbone, self.train, self.size, self.batch_size, self.workers, progress=False)
        test = extract_features(backbone, self.test, self.size, self.batch_size, self.workers, progress=False)
        results = knn_evaluate(
            train, self.train_labels, test, self.test_labels, self.k, self.temperature, self.task, self.num_classes
        )
        values = {f"knn_{r.metric.lower()}@{r.k}": r.value for r in results if not math.isnan(r.value)}
        skipped = int((~valid_rows(train)).sum() + (~valid_rows(test)).sum())
        return {**values, "knn_images_skipped": float(skipped)}


def _subset(records: Records, limit: int, rng: np.random.Generator) -> Records:
    if len(records) <= limit:
        return records
    return records.subset(np.sort(rng.choice(len(records), size=limit, replace=False)))
