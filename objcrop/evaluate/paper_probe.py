"""The ``paper`` linear probe: the MoCo-style protocol the paper follows.

The linear layer is trained through the frozen network on augmented images (RandomResizedCrop + flip)
every epoch, SGD lr 30, momentum 0.9, no weight decay, 100 epochs, lr x0.1 at 60% and 80% of the epochs;
test is read out once at the end with the deterministic read-out transform.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from objcrop.data.records import Records
from objcrop.evaluate.backbone import load_backbone
from objcrop.evaluate.cached_probe import LinearClassifier, as_targets, evaluate_linear, num_classes_of
from objcrop.evaluate.features import RecordImages, augment_transform, extract_features, valid_rows
from objcrop.evaluate.linear import LinearResult
from objcrop.evaluate.losses import classification_loss
from objcrop.evaluate.metrics import chance_level, labels_for_task, metric_name

__all__ = ["PAPER_LR", "PAPER_WEIGHT_DECAY", "paper_linear_probe", "paper_milestones", "paper_probe"]

logger = logging.getLogger(__name__)

PAPER_LR = 30.0
PAPER_WEIGHT_DECAY = 0.0


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
    lr: float = PAPER_LR,
    milestones: Sequence[float] = (0.6, 0.8),
    momentum: float = 0.9,
    weight_decay: float = PAPER_WEIGHT_DECAY,
    batch_size: int = 256,
    workers: int = 0,
    seed: int = 0,
    num_classes: int | None = None,
    progress: bool = True,
) -> LinearClassifier:
    """Trains a linear layer through the frozen ``backbone`` on augmented images (the paper's protocol).

    The backbone stays in eval mode (BatchNorm statistics frozen) and gets no gradient. The lr drops
    x0.1 at each fraction of ``epochs`` in ``milestones`` (60 and 80 of 100 epochs by default).
    Unreadable images are left out of the loss, counted and logged: the returned head's ``unreadable``
    lists their indices in ``records`` (each once, however many epochs read it).

    Args:
        backbone: Network mapping images to ``[B, D]`` features.
        records: Training images.
        labels: Their targets (see :func:`~objcrop.evaluate.metrics.labels_for_task`).
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

    Raises:
        ValueError: No training image could be read.
    """
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, size, size, device=device)).shape[1]
    ys = as_targets(task, labels)
    classes = num_classes if num_classes is not None else num_classes_of(task, labels)
    head = LinearClassifier(dim, classes).to(device)
    with torch.random.fork_rng(devices=[]):  # a function of the seed, not of the caller's global stream
        torch.manual_seed(seed)
        head.fc.reset_parameters()  # the MoCo protocol starts from a small random layer, not zeros
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=paper_milestones(epochs, milestones), gamma=0.1)
    dataset = RecordImages(records, augment_transform(size), size)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=gen)
    start, seen = time.perf_counter(), 0
    unreadable: set[int] = set()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in tqdm(range(epochs), desc="paper linear", unit="epoch", disable=not progress, dynamic_ncols=True):
                for images, index, ok in loader:
                    unreadable.update(index[~ok].tolist())
                    if not ok.any():
                        continue
                    with torch.no_grad():
                        feats = backbone(images[ok].to(device))
                    loss = classification_loss(task, head(feats), ys[index[ok]].to(device), class_reduction="sum")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    seen += int(ok.sum())
                sched.step()
    finally:
        backbone.train(was_training)
    elapsed = time.perf_counter() - start
    if len(records) and len(unreadable) == len(records):
        raise ValueError(f"none of the {len(records)} training images under {records.root} could be read")
    if unreadable:
        logger.warning(
            "paper linear protocol: %d of %d training images could not be read; left out of the loss",
            len(unreadable), len(records),
        )  # fmt: skip
    logger.info("paper linear protocol: %d epochs in %.1f s (%.1f img/s)", epochs, elapsed, seen / max(elapsed, 1e-9))
    head = head.cpu().eval()
    head.unreadable = sorted(unreadable)
    return head


def paper_probe(
    spec: str | os.PathLike,
    train_records: Records,
    test_records: Records,
    task: str = "multi",
    size: int = 128,
    arch: str | None = None,
    small_images: bool | None = None,
    seed: int = 0,
    mode: str = "center",
    epochs: int = 100,
    batch_size: int = 256,
    feature_batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LinearResult:
    """The ``paper`` protocol of :func:`objcrop.evaluate.linear.linear_probe`: loads ``spec``, trains the head
    with :func:`paper_linear_probe` for ``epochs``, and scores test read out with ``mode``."""
    train_y, test_y = labels_for_task(train_records, task), labels_for_task(test_records, task)
    backbone, dim = load_backbone(spec, arch, small_images, seed=seed)
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
    train_skipped = len(head.unreadable)
    value, evaluated, skipped_classes = evaluate_linear(head, test_x[ok], test_y[ok], task)
    return LinearResult(
        metric=metric_name(task),
        value=value,
        classes_evaluated=evaluated,
        classes_skipped=skipped_classes,
        chance=chance_level(task, test_y[ok]),
        task=task,
        protocol="paper",
        backbone=os.fspath(spec),
        size=size,
        train_images=len(train_records) - train_skipped,
        test_images=int(ok.sum()),
        images_skipped=train_skipped + int((~ok).sum()),
        feature_dim=dim,
        lr=PAPER_LR,
        weight_decay=PAPER_WEIGHT_DECAY,
        epochs=epochs,
        seconds_features=seconds_features,
        seconds_train=seconds_train,
    )
