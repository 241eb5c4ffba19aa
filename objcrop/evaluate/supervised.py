"""The supervised baseline: the same backbone trained from scratch with labels (the paper's upper reference).

Multi-label images train with binary cross-entropy, single-label ones with cross-entropy; Adam, lr 1e-3
(the paper's setting), RandomResizedCrop + flip. The result is scored twice on test: with the network's
own classifier head, and with the same linear probe as every pretrained backbone (on frozen features).

The saved file is a full torchvision ResNet state dict (``conv1.weight`` ... ``fc.bias``) plus the
sidecar ``<file>.json`` holding ``arch``, ``small_images``, ``num_classes`` and ``class_names``, so
:func:`objcrop.evaluate.backbone.load_backbone` reads it without ``--arch`` (it ignores ``fc``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from objcrop.data.records import Records
from objcrop.evaluate.features import RecordImages, augment_transform, extract_features, valid_rows
from objcrop.evaluate.linear import linear_probe
from objcrop.evaluate.losses import classification_loss
from objcrop.evaluate.metrics import chance_level, labels_for_task, score_predictions
from objcrop.io import atomic_torch_save
from objcrop.ssl.backbone_io import check_state_dict_out, mark_state_dict, write_arch_sidecar
from objcrop.ssl.backbones import build_backbone, is_timm

__all__ = [
    "SupervisedResult",
    "SupervisedTraining",
    "build_classifier",
    "save_classifier",
    "supervised_baseline",
    "train_supervised",
]

logger = logging.getLogger(__name__)


def build_classifier(arch: str, num_classes: int, small_images: bool = False) -> nn.Sequential:
    """A randomly initialised ResNet trunk followed by ``fc``; its state dict has torchvision's names."""
    if is_timm(arch):  # a TimmTrunk's forward would skip an added fc
        raise ValueError(f"the supervised baseline trains torchvision ResNets, not {arch}")
    net, dim = build_backbone(arch, small_images=small_images)
    net.add_module("fc", nn.Linear(dim, num_classes))
    return net


class SupervisedTraining(NamedTuple):
    """What :func:`train_supervised` returns: the network, its loss per epoch and what it could not train on."""

    model: nn.Sequential
    losses: list[float]
    unreadable_images: int  # distinct training images that could not be read (each logged when met)
    dropped_batches: int  # batches left with fewer than two readable images (BatchNorm needs two), all epochs


def train_supervised(
    records: Records,
    arch: str = "resnet18",
    small_images: bool = False,
    task: str = "multi",
    size: int = 64,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SupervisedTraining:
    """Trains :func:`build_classifier` from scratch on the image-level labels of ``records``.

    Args:
        records: Training images.
        arch: Backbone name.
        small_images: Small-image stem (3x3 conv, no max-pool).
        task: ``"multi"`` (BCE) or ``"single"`` (cross-entropy).
        size: Side of the training crops.
        epochs: Passes over the images.
        batch_size: Images per step (the last, incomplete batch is dropped when there is more than one).
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty.
        crop_scale: Area share of the RandomResizedCrop. The default keeps at least 20% of the image,
            so that a multi-label crop still shows most of the labelled objects.
        workers: DataLoader worker processes.
        seed: Seed of the initial weights, the batch order and the augmentations.
        device: Where to train.
        progress: Show a progress bar.

    Returns:
        The trained network (eval mode, on CPU), the mean training loss of each epoch, the number of distinct
        unreadable training images and the number of batches dropped for having fewer than two readable images.
    """
    labels = labels_for_task(records, task)
    targets = torch.as_tensor(labels, dtype=torch.float32 if task == "multi" else torch.int64)
    dataset = RecordImages(records, augment_transform(size, tuple(crop_scale)), size)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=gen,
        drop_last=len(dataset) > batch_size,
    )
    losses: list[float] = []
    unreadable: set[int] = set()
    dropped = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(arch, records.num_classes, small_images).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        bar = tqdm(total=epochs * len(loader), desc="supervised", unit="step", disable=not progress, dynamic_ncols=True)
        start, seen = time.perf_counter(), 0
        for epoch in range(epochs):
            total, count = 0.0, 0
            for images, index, ok in loader:
                unreadable.update(index[~ok].tolist())
                if int(ok.sum()) < 2:  # BatchNorm needs two images
                    dropped += 1
                    continue
                # Averaged over the classes too (see classification_loss for why the probes sum instead).
                loss = classification_loss(
                    task, model(images[ok].to(device)), targets[index[ok]].to(device), class_reduction="mean"
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = int(ok.sum())
                total, count, seen = total + loss.item() * n, count + n, seen + n
                bar.update(1)
                bar.set_postfix(
                    epoch=epoch, loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - start):.1f}"
                )
            losses.append(total / max(count, 1))
        bar.close()
    elapsed = time.perf_counter() - start
    logger.info(
        "supervised: %d epochs in %.1f s (%.1f img/s); %d unreadable training images skipped, %d batches dropped",
        epochs,
        elapsed,
        seen / max(elapsed, 1e-9),
        len(unreadable),
        dropped,
    )
    return SupervisedTraining(model.cpu().eval(), losses, len(unreadable), dropped)


def save_classifier(
    model: nn.Sequential, path: str | os.PathLike, arch: str, small_images: bool, class_names: Sequence[str], **extra
) -> Path:
    """Writes the torchvision-named state dict to ``path`` and the sidecar ``<path>.json`` (both atomically).

    Raises:
        ValueError: ``path`` or its sidecar holds a file objcrop did not write (see
            :func:`~objcrop.ssl.backbone_io.check_state_dict_out`); nothing is written then.
    """
    path = check_state_dict_out(path)
    atomic_torch_save(mark_state_dict(model.state_dict()), path)
    write_arch_sidecar(path, arch, small_images, num_classes=len(class_names), class_names=list(class_names), **extra)
    return path


@dataclass
class SupervisedResult:
    """The baseline's scores on test (percentages): its own head and the linear probe on its frozen features."""

    checkpoint: str
    arch: str
    small_images: bool
    task: str
    metric: str
    epochs: int
    size: int
    head_value: float
    classes_evaluated: int
    classes_skipped: int
    chance: float
    linear: dict
    losses: list[float] = field(default_factory=list)
    seconds_train: float = 0.0
    train_unreadable: int = 0  # distinct training images skipped as unreadable
    dropped_batches: int = 0  # training batches with fewer than two readable images
    test_unreadable: int = 0  # test images the own head could not score (left out of head_value)

    def to_dict(self) -> dict:
        return asdict(self)


def supervised_baseline(
    train_records: Records,
    test_records: Records,
    out: str | os.PathLike,
    arch: str = "resnet18",
    small_images: bool = False,
    task: str = "multi",
    size: int = 64,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    probe: dict | None = None,
    progress: bool = True,
) -> SupervisedResult:
    """Trains the baseline, saves it to ``out``, and scores it on test with its head and with the linear probe.

    Args:
        train_records: Training images.
        test_records: Test images.
        out: The state dict file to write (``<out>.json`` is its sidecar); each must be absent or written by
            objcrop, else a ValueError naming it is raised before the training.
        arch: Backbone name.
        small_images: Small-image stem.
        task: ``"multi"`` or ``"single"``.
        size: Training crop side and read-out side.
        epochs: Training epochs.
        batch_size: Images per step.
        lr: Adam learning rate.
        crop_scale: Area share of the RandomResizedCrop.
        workers: DataLoader worker processes.
        seed: Seed of the training and of the probe.
        device: Where to train and extract features.
        probe: Extra keyword arguments of :func:`~objcrop.evaluate.linear.linear_probe` (e.g. ``epochs``,
            ``cache_dir``, ``protocol``).
        progress: Show progress bars.
    """
    if train_records.class_names != test_records.class_names:
        raise ValueError(f"train ({train_records.root}) and test ({test_records.root}) have different classes")
    check_state_dict_out(out)  # before the training: a foreign file at ``out`` would be found only after it
    start = time.perf_counter()
    model, losses, train_unreadable, dropped = train_supervised(
        train_records,
        arch=arch,
        small_images=small_images,
        task=task,
        size=size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        crop_scale=crop_scale,
        workers=workers,
        seed=seed,
        device=device,
        progress=progress,
    )
    seconds_train = time.perf_counter() - start
    path = save_classifier(model, out, arch, small_images, train_records.class_names, task=task, epochs=epochs)

    logits = extract_features(model.to(device), test_records, size, workers=workers, progress=progress)
    ok = valid_rows(logits)
    test_y = labels_for_task(test_records, task)[ok]
    head_value, evaluated, skipped = score_predictions(task, test_y, logits[ok].astype(np.float32))
    linear = linear_probe(
        path,
        train_records,
        test_records,
        task=task,
        size=size,
        seed=seed,
        workers=workers,
        device=device,
        progress=progress,
        **(probe or {}),
    )
    return SupervisedResult(
        checkpoint=str(path),
        arch=arch,
        small_images=small_images,
        task=task,
        metric="mAP" if task == "multi" else "top1",
        epochs=epochs,
        size=size,
        head_value=head_value,
        classes_evaluated=evaluated,
        classes_skipped=skipped,
        chance=chance_level(task, test_y),
        linear=linear.to_dict(),
        losses=losses,
        seconds_train=seconds_train,
        train_unreadable=train_unreadable,
        dropped_batches=dropped,
        test_unreadable=int((~ok).sum()),
    )
