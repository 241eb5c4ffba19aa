"""Linear probe on frozen features: metrics, a fast probe on cached features, and the paper's protocol.

Metrics are percentages (0-100). Multi-label: mAP, the mean over classes of the average precision
(Veit et al. 2017, eq. 4, the paper's metric), computed by ``sklearn.metrics.average_precision_score``;
classes without a positive in the evaluated split have no AP and are skipped and counted.
Single-label: top-1 accuracy.

Two protocols:

* ``cached`` (default): features are extracted once at the read-out resolution and cached
  (:mod:`objcrop.evaluate.features`); a linear classifier on standardised features is trained with
  SGD for each (lr, weight decay) of a grid on a seeded train/val split of the train split; the best on
  val is retrained on the whole train split and scored on test. Test never takes part in the choice.
* ``paper``: the MoCo-style protocol the paper follows: the linear layer is trained through the frozen
  network on augmented images (RandomResizedCrop + flip) every epoch, SGD lr 30, momentum 0.9, no weight
  decay, 100 epochs, lr x0.1 at 60% and 80% of the epochs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch.utils.data import DataLoader
from tqdm import tqdm

from objcrop.data.records import Records
from objcrop.evaluate.features import RecordImages, augment_transform, cached_features, extract_features, valid_rows

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_WDS",
    "PROTOCOLS",
    "TASKS",
    "LinearClassifier",
    "LinearResult",
    "chance_level",
    "evaluate_linear",
    "fit_linear",
    "labels_for_task",
    "linear_probe",
    "mean_average_precision",
    "paper_linear_probe",
    "paper_milestones",
    "predict",
    "score_predictions",
    "split_train_val",
    "top1_accuracy",
    "train_linear",
]

logger = logging.getLogger(__name__)

TASKS = ("multi", "single")
PROTOCOLS = ("cached", "paper")
DEFAULT_LRS = (0.01, 0.1, 1.0)
DEFAULT_WDS = (0.0, 1e-3, 1e-2, 1e-1)


# -- metrics ----------------------------------------------------------------------------------------
def mean_average_precision(targets: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """Mean over classes of the average precision, in percent.

    Args:
        targets: ``[N, C]`` multi-hot ground truth.
        scores: ``[N, C]`` scores, higher meaning more likely.

    Returns:
        ``(mAP, classes evaluated, classes skipped)``; a class is skipped when it has no positive
        (its AP is undefined). ``mAP`` is NaN when every class is skipped.
    """
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
    if task == "single":
        return top1_accuracy(labels, scores), int(np.asarray(scores).shape[1]), 0
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


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
    if task != "single":
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    counts = np.diff(records.label_offsets)
    bad = np.flatnonzero(counts != 1)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"--task single needs exactly one label per image; {records.path(i)} has {int(counts[i])} "
            f"({len(bad)} such images); use --task multi"
        )
    return records.labels.astype(np.int64)


# -- the classifier -----------------------------------------------------------------------------------
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


def _loss(task: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "multi":
        # Summed over classes, averaged over images: each class is a logistic regression of its own.
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)
    return F.cross_entropy(logits, y)


def _as_targets(task: str, y: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.float32 if task == "multi" else torch.int64)


def _num_classes(task: str, *labels: np.ndarray) -> int:
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
    ys = _as_targets(task, y)
    classes = num_classes if num_classes is not None else _num_classes(task, np.asarray(y))
    model = LinearClassifier(xs.shape[1], classes, xs.mean(0), xs.std(0).clamp_min(1e-6))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(xs) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(batch_size):
            loss = _loss(task, model(xs[idx]), ys[idx])
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


# -- the paper's protocol -----------------------------------------------------------------------------
def paper_milestones(epochs: int, fractions: Sequence[float] = (0.6, 0.8)) -> list[int]:
    """Epochs where the paper protocol's lr drops: ``[60, 80]`` for 100 epochs, scaled for fewer."""
    return sorted({max(1, round(f * epochs)) for f in fractions})


def paper_linear_probe(
    backbone: nn.Module,
    records: Records,
    labels: np.ndarray,
    task: str,
    size: int,
    epochs: int = 100,
    lr: float = 30.0,
    milestones: Sequence[float] = (0.6, 0.8),
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    workers: int = 0,
    seed: int = 0,
    num_classes: int | None = None,
    progress: bool = True,
) -> LinearClassifier:
    """Trains a linear layer through the frozen ``backbone`` on augmented images (the paper's protocol).

    The backbone stays in eval mode (BatchNorm statistics frozen) and gets no gradient. The lr drops
    x0.1 at each fraction of ``epochs`` in ``milestones`` (60 and 80 of 100 epochs by default).
    Unreadable images are left out of the loss.

    Args:
        backbone: Network mapping images to ``[B, D]`` features.
        records: Training images.
        labels: Their targets (see :func:`labels_for_task`).
        task: ``"multi"`` or ``"single"``.
        size: Side of the RandomResizedCrop.
        epochs: Passes over the images.
        lr: Initial learning rate.
        milestones: Fractions of ``epochs`` where the lr is multiplied by 0.1.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        batch_size: Images per step.
        workers: DataLoader worker processes.
        seed: Seed of the batch order and the augmentations.
        num_classes: Number of classes for ``single`` (defaults to ``max(labels) + 1``).
        progress: Show a progress bar.
    """
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, size, size, device=device)).shape[1]
    ys = _as_targets(task, labels)
    classes = num_classes if num_classes is not None else _num_classes(task, labels)
    head = LinearClassifier(dim, classes).to(device)
    head.fc.reset_parameters()  # the MoCo protocol starts from a small random layer, not zeros
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=paper_milestones(epochs, milestones), gamma=0.1)
    dataset = RecordImages(records, augment_transform(size), size)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=gen)
    start, seen = time.perf_counter(), 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in tqdm(range(epochs), desc="paper linear", unit="epoch", disable=not progress, dynamic_ncols=True):
                for images, index, ok in loader:
                    if not ok.any():
                        continue
                    with torch.no_grad():
                        feats = backbone(images[ok].to(device))
                    loss = _loss(task, head(feats), ys[index[ok]].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    seen += int(ok.sum())
                sched.step()
    finally:
        backbone.train(was_training)
    elapsed = time.perf_counter() - start
    logger.info("paper linear protocol: %d epochs in %.1f s (%.1f img/s)", epochs, elapsed, seen / max(elapsed, 1e-9))
    return head.cpu().eval()


# -- the whole probe ----------------------------------------------------------------------------------
@dataclass
class LinearResult:
    """Outcome of a linear probe. ``value`` and ``chance`` are percentages."""

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


def _check_classes(train: Records, test: Records) -> None:
    if train.class_names != test.class_names:
        raise ValueError(
            f"train ({train.root}) and test ({test.root}) datasets have different classes: "
            f"{len(train.class_names)} vs {len(test.class_names)}"
        )


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
    _check_classes(train_records, test_records)
    if protocol == "paper":
        backbone_args = dict(spec=spec, arch=arch, small_images=small_images, seed=seed, device=device)
        return _paper_probe(
            backbone_args,
            train_records,
            test_records,
            task=task,
            size=size,
            mode=mode,
            epochs=paper_epochs,
            batch_size=batch_size,
            feature_batch_size=feature_batch_size,
            workers=workers,
            progress=progress,
        )

    train_y, test_y = labels_for_task(train_records, task), labels_for_task(test_records, task)
    start = time.perf_counter()
    common = dict(
        spec=spec,
        size=size,
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
    train_x, hit_train = cached_features(records=train_records, split="train", **common)
    test_x, hit_test = cached_features(records=test_records, split="test", **common)
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
        metric="mAP" if task == "multi" else "top1",
        value=value,
        classes_evaluated=evaluated,
        classes_skipped=skipped_classes,
        chance=chance_level(task, test_y),
        task=task,
        protocol=protocol,
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
        cache_hits=int(hit_train) + int(hit_test),
        grid=chosen["grid"],
    )


def _paper_probe(
    backbone_args: dict,
    train_records: Records,
    test_records: Records,
    task: str,
    size: int,
    mode: str,
    epochs: int,
    batch_size: int,
    feature_batch_size: int,
    workers: int,
    progress: bool,
) -> LinearResult:
    from objcrop.evaluate.backbone import load_backbone

    train_y, test_y = labels_for_task(train_records, task), labels_for_task(test_records, task)
    device, seed = backbone_args["device"], backbone_args["seed"]
    backbone, dim = load_backbone(
        backbone_args["spec"], backbone_args["arch"], backbone_args["small_images"], seed=seed
    )
    backbone = backbone.to(device)
    start = time.perf_counter()
    head = paper_linear_probe(
        backbone,
        train_records,
        train_y,
        task,
        size,
        epochs=epochs,
        batch_size=batch_size,
        workers=workers,
        seed=seed,
        num_classes=train_records.num_classes,
        progress=progress,
    )
    seconds_train = time.perf_counter() - start
    start = time.perf_counter()
    test_x = extract_features(backbone, test_records, size, feature_batch_size, workers, mode, progress)
    seconds_features = time.perf_counter() - start
    ok = valid_rows(test_x)
    value, evaluated, skipped_classes = evaluate_linear(head, test_x[ok], test_y[ok], task)
    return LinearResult(
        metric="mAP" if task == "multi" else "top1",
        value=value,
        classes_evaluated=evaluated,
        classes_skipped=skipped_classes,
        chance=chance_level(task, test_y[ok]),
        task=task,
        protocol="paper",
        backbone=os.fspath(backbone_args["spec"]),
        size=size,
        train_images=len(train_records),
        test_images=int(ok.sum()),
        images_skipped=int((~ok).sum()),
        feature_dim=dim,
        lr=30.0,
        weight_decay=0.0,
        epochs=epochs,
        seconds_features=seconds_features,
        seconds_train=seconds_train,
    )
