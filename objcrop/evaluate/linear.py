"""Linear probe on frozen features: the entry point :func:`linear_probe`, its result, choices and defaults.

Two protocols, each in its own module:

* ``cached`` (default, :mod:`objcrop.evaluate.cached_probe`): a linear classifier on cached, standardised
  features, lr and weight decay chosen on a seeded validation share of the train split.
* ``paper`` (:mod:`objcrop.evaluate.paper_probe`): the MoCo-style protocol the paper follows, a linear layer
  trained through the frozen network on augmented images (SGD lr 30, 100 epochs, lr x0.1 at 60% and 80%).

The metrics live in :mod:`objcrop.evaluate.metrics`. This module imports neither torch nor sklearn
when it is imported (the command line takes :data:`PROTOCOLS` and the default grids from it while it
builds its parser); the protocol modules load on first use, and their public names stay reachable
from here (``objcrop.evaluate.linear.fit_linear``, ...).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from objcrop.data.records import Records
from objcrop.evaluate.metrics import (
    TASKS,
    chance_level,
    check_same_classes,
    labels_for_task,
    mean_average_precision,
    score_predictions,
    top1_accuracy,
)

if TYPE_CHECKING:
    import torch

PROTOCOLS = ("cached", "paper")
DEFAULT_LRS = (0.01, 0.1, 1.0)
DEFAULT_WDS = (0.0, 1e-3, 1e-2, 1e-1)

# Names of the protocol modules, loaded when first asked for (they import torch).
_LAZY = {
    "LinearClassifier": "cached_probe",
    "evaluate_linear": "cached_probe",
    "fit_linear": "cached_probe",
    "predict": "cached_probe",
    "split_train_val": "cached_probe",
    "train_linear": "cached_probe",
    "paper_linear_probe": "paper_probe",
    "paper_milestones": "paper_probe",
}

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_WDS",
    "PROTOCOLS",
    "TASKS",
    "LinearResult",
    "chance_level",
    "labels_for_task",
    "linear_probe",
    "mean_average_precision",
    "score_predictions",
    "top1_accuracy",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"objcrop.evaluate.{_LAZY[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


@dataclass
class LinearResult:
    """Outcome of a linear probe (either protocol). ``value`` and ``chance`` are percentages."""

    metric: str
    value: float
    classes_evaluated: int
    classes_skipped: int
    chance: float
    task: str
    protocol: str
    backbone: str
    size: int
    train_images: int
    test_images: int
    images_skipped: int
    feature_dim: int
    lr: float
    weight_decay: float
    epochs: int
    val_value: float | None = None
    seconds_features: float = 0.0
    seconds_train: float = 0.0
    cache_hits: int = 0
    grid: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_probe(
    spec: str | os.PathLike,
    train_records: Records,
    test_records: Records,
    task: str = "multi",
    size: int = 128,
    protocol: str = "cached",
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
    paper_epochs: int = 100,
    feature_batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LinearResult:
    """Linear probe of the backbone ``spec`` on a train/test pair of datasets.

    Args:
        spec: Backbone (see :func:`objcrop.evaluate.backbone.load_backbone`).
        train_records: Training split; its labels fit the classifier.
        test_records: Test split, scored once at the end.
        task: ``"multi"`` (mAP) or ``"single"`` (top-1).
        size: Read-out side in pixels (and the crop side of the paper protocol).
        protocol: ``"cached"`` or ``"paper"`` (see the module docstring).
        cache_dir: Feature cache folder (``cached``); defaults to one next to the weights.
        arch: Architecture of a plain state dict.
        small_images: Small-image stem of a plain state dict or random init.
        seed: Seed of random weights, the val split, and the batch order.
        mode: Read-out geometry (``center`` or ``squash``).
        lrs: Learning rates to try (``cached``).
        wds: Weight decays to try (``cached``).
        epochs: Epochs of each fit on cached features.
        batch_size: Images per step.
        val_fraction: Share of the train split held out to choose lr and weight decay (``cached``).
        paper_epochs: Epochs of the paper protocol (100 in the paper; the lr steps scale with it).
        feature_batch_size: Images per forward pass when extracting features.
        workers: DataLoader worker processes.
        device: Where the backbone runs.
        progress: Show progress bars.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    check_same_classes(train_records, test_records)
    if protocol == "paper":
        from objcrop.evaluate.paper_probe import paper_probe

        return paper_probe(
            spec,
            train_records,
            test_records,
            task=task,
            size=size,
            arch=arch,
            small_images=small_images,
            seed=seed,
            mode=mode,
            epochs=paper_epochs,
            batch_size=batch_size,
            feature_batch_size=feature_batch_size,
            workers=workers,
            device=device,
            progress=progress,
        )
    from objcrop.evaluate.cached_probe import cached_linear_probe

    return cached_linear_probe(
        spec,
        train_records,
        test_records,
        task=task,
        size=size,
        cache_dir=cache_dir,
        arch=arch,
        small_images=small_images,
        seed=seed,
        mode=mode,
        lrs=lrs,
        wds=wds,
        epochs=epochs,
        batch_size=batch_size,
        val_fraction=val_fraction,
        feature_batch_size=feature_batch_size,
        workers=workers,
        device=device,
        progress=progress,
    )
