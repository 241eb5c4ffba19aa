"""Evaluation metrics and targets shared by the linear probe, kNN and the supervised baseline.

Metrics are percentages (0-100). Multi-label: mAP, the mean over classes of the average precision
(Veit et al. 2017, eq. 4, the paper's metric), computed by ``sklearn.metrics.average_precision_score``;
classes without a positive in the evaluated split have no AP and are skipped and counted.
Single-label: top-1 accuracy.

This module imports neither torch nor sklearn at import time, so the command line can take
:data:`TASKS` from it while it builds its parser.
"""

from __future__ import annotations

import numpy as np

from objcrop.data.records import Records

__all__ = [
    "TASKS",
    "chance_level",
    "check_same_classes",
    "labels_for_task",
    "mean_average_precision",
    "metric_name",
    "score_predictions",
    "top1_accuracy",
]

TASKS = ("multi", "single")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def metric_name(task: str) -> str:
    """The name of the task's metric: ``"mAP"`` for ``multi``, ``"top1"`` for ``single``."""
    _check_task(task)
    return "mAP" if task == "multi" else "top1"


def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """Mean over classes of the average precision, in percent.

    Args:
        targets: ``[N, C]`` multi-hot ground truth.
        scores: ``[N, C]`` scores, higher meaning more likely.

    Returns:
        ``(mAP, classes evaluated, classes skipped)``; a class is skipped when it has no positive
        (its AP is undefined). ``mAP`` is NaN when every class is skipped.
    """
    from sklearn.metrics import average_precision_score  # here, so that importing the module stays light

    targets = np.asarray(targets)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be [N, C]")
    has_positive = targets.sum(axis=0) > 0
    if not has_positive.any():
        return float("nan"), 0, int(targets.shape[1])
    ap = average_precision_score(targets[:, has_positive], scores[:, has_positive], average=None)
    return 100.0 * float(np.mean(ap)), int(has_positive.sum()), int((~has_positive).sum())


def top1_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of rows whose highest score is the label, in percent."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        return float("nan")
    return 100.0 * float(np.mean(np.asarray(scores).argmax(axis=1) == labels))


def score_predictions(task: str, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """The task's metric: ``(value in percent, classes evaluated, classes skipped)``.

    For ``single``, every class counts as evaluated (top-1 has no per-class part).
    """
    if task == "multi":
        return mean_average_precision(labels, scores)
    _check_task(task)
    return top1_accuracy(labels, scores), int(np.asarray(scores).shape[1]), 0


def chance_level(task: str, labels: np.ndarray) -> float:
    """What a classifier without information scores, in percent: for ``multi`` the mean prevalence of the
    classes with a positive (the expected AP of random scores), for ``single`` the share of the largest class."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    if task == "multi":
        prevalence = labels.mean(axis=0)
        return 100.0 * float(prevalence[prevalence > 0].mean()) if (prevalence > 0).any() else float("nan")
    return 100.0 * float(np.bincount(labels.reshape(-1)).max() / len(labels))


def labels_for_task(records: Records, task: str) -> np.ndarray:
    """Image-level targets: float32 multi-hot ``[N, C]`` for ``multi``, int64 ``[N]`` for ``single``.

    Raises:
        ValueError: The dataset has no classes, or for ``single`` an image has not exactly one label.
    """
    if records.num_classes == 0:
        raise ValueError(f"dataset under {records.root} has no classes to evaluate")
    if task == "multi":
        return records.label_matrix().astype(np.float32)
    _check_task(task)
    counts = np.diff(records.label_offsets)
    bad = np.flatnonzero(counts != 1)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"--task single needs exactly one label per image; {records.path(i)} has {int(counts[i])} "
            f"({len(bad)} such images); use --task multi"
        )
    return records.labels.astype(np.int64)


def check_same_classes(train: Records, test: Records) -> None:
    """Raises ``ValueError`` naming both dataset roots when ``train`` and ``test`` have different class lists."""
    if train.class_names != test.class_names:
        raise ValueError(
            f"train ({train.root}) and test ({test.root}) datasets have different classes: "
            f"{len(train.class_names)} vs {len(test.class_names)}"
        )
