"""Detection transfer: fine-tune Faster R-CNN + FPN on a pretrained backbone, then COCO box AP.

The pieces: :mod:`~objcrop.evaluate.detection_model` builds the detector on the backbone weights,
:mod:`~objcrop.evaluate.detection_data` turns Records into samples, :mod:`~objcrop.evaluate.detection_metrics`
scores with pycocotools; this module holds the fine-tuning loop (SGD, warmup + step schedule, AMP on
GPU, resumable checkpoints), inference, and :func:`run_detection`, which chains them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from objcrop.data.records import Records
from objcrop.evaluate.detection_data import DetectionDataset, collate_detection
from objcrop.evaluate.detection_metrics import (
    METRICS,
    Detections,
    coco_evaluate,
    ground_truth_from_json,
    ground_truth_from_records,
)
from objcrop.evaluate.detection_model import backbone_weights, build_detector
from objcrop.io import atomic_torch_save, write_json_atomic
from objcrop.ssl.errors import NonFiniteLossError
from objcrop.ssl.sampler import EpochSampler

__all__ = [
    "DetectionConfig",
    "DetectionResult",
    "TrainStats",
    "detection_lr_lambda",
    "predict",
    "run_detection",
    "train_detector",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "detector.pt"
METRICS_NAME = "metrics.json"


@dataclass
class DetectionConfig:
    """Settings of a detection transfer run (defaults follow Detectron2's 1x schedule, scaled by batch).

    Attributes:
        arch: torchvision ResNet name; ``None`` takes it from an objcrop checkpoint (else resnet50).
        trainable_layers: ResNet stages trained, from ``layer4`` (0..5; 5 = all, Detectron2's FREEZE_AT 0).
        norm: ``"frozen"`` (torchvision) or ``"bn"`` (Detectron2/MoCo protocol; SyncBN there).
        min_size: Shorter image side(s) for training; the last is used for testing.
        max_size: Longest image side.
        proposals_train: RPN proposals per image in training (torchvision: 2000).
        proposals_test: RPN proposals per image in testing (torchvision: 1000).
        rois_per_image: Proposals sampled per image for the box head's loss (512).
        box_head: ``"auto"`` (4conv1fc with ``bn``, 2fc with ``frozen``), ``"2fc"`` or ``"4conv1fc"``.
        anchor_sizes: Anchor side per pyramid level P2-P6 in pixels of the resized image (``None``:
            torchvision's 32-512, made for 800 px images; use smaller ones for small images).
        fpn_channels: Channels of the FPN maps (256; fewer make small CPU runs much faster).
        epochs: Passes over the training set.
        max_iters: Stop after this many iterations (0: no limit).
        batch_size: Images per iteration.
        lr: Base learning rate; ``None`` means ``0.02 * batch_size / 16``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_iters: Linear warmup length (cut to the run's length).
        warmup_factor: Learning-rate factor at iteration 0 of the warmup.
        lr_steps: Fractions of the run after which the learning rate is multiplied by ``lr_gamma``
            (1x schedule: 60k and 80k of 90k).
        lr_gamma: Factor of each step.
        hflip_prob: Horizontal flip probability in training.
        seed: Seed of the shuffling, the flips and the heads' initialisation.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        amp: Mixed precision (fp16 with a grad scaler) on CUDA; ignored on CPU.
        workers: DataLoader processes.
        checkpoint_every: Also checkpoint every this many iterations (0: at the end of each epoch only).
        eval_batch_size: Images per inference batch.
    """

    arch: str | None = None
    trainable_layers: int = 3
    norm: str = "frozen"
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    proposals_train: int = 2000
    proposals_test: int = 1000
    rois_per_image: int = 512
    box_head: str = "auto"
    anchor_sizes: tuple[int, ...] | None = None
    fpn_channels: int = 256
    epochs: int = 12
    max_iters: int = 0
    batch_size: int = 16
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: tuple[float, ...] = (2 / 3, 8 / 9)
    lr_gamma: float = 0.1
    hflip_prob: float = 0.5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    workers: int = 4
    checkpoint_every: int = 0
    eval_batch_size: int = 4

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 0.02 * self.batch_size / 16

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint (not the device or the workers)."""
        fields = dataclasses.asdict(self)
        for name in ("device", "amp", "workers", "checkpoint_every", "eval_batch_size"):
            fields.pop(name)
        # Settings added later are left out at their defaults, so older checkpoints still resume.
        for name, default in (("box_head", "auto"), ("anchor_sizes", None), ("fpn_channels", 256)):
            if fields[name] == default:
                fields.pop(name)
        return fields


@dataclass
class TrainStats:
    """What the fine-tuning did."""

    iterations: int
    final_loss: float
    images_per_second: float
    skipped_images: int
    seconds: float


@dataclass
class DetectionResult:
    """Metrics and bookkeeping of :func:`run_detection`."""

    metrics: dict[str, float]
    train: TrainStats
    test_images: int
    test_skipped: int
    eval_images_per_second: float
    checkpoint: str

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "train_iters": self.train.iterations,
            "final_loss": self.train.final_loss,
            "train_img_per_s": round(self.train.images_per_second, 3),
            "train_seconds": round(self.train.seconds, 2),
            "train_skipped": self.train.skipped_images,
            "test_images": self.test_images,
            "test_skipped": self.test_skipped,
            "eval_img_per_s": round(self.eval_images_per_second, 3),
            "checkpoint": self.checkpoint,
        }


def detection_lr_lambda(
    total_iters: int, warmup_iters: int, warmup_factor: float, steps: Sequence[float], gamma: float
):
    """Detectron2's WarmupMultiStepLR as a ``LambdaLR`` factor: linear warmup from ``warmup_factor``,
    then ``gamma`` at each fraction of ``total_iters`` in ``steps``."""
    warmup = min(warmup_iters, total_iters)
    milestones = sorted(int(round(s * total_iters)) for s in steps)

    def factor(it: int) -> float:
        decay = gamma ** sum(it >= m for m in milestones)
        if it < warmup:
            alpha = it / warmup
            return decay * (warmup_factor * (1 - alpha) + alpha)
        return decay

    return factor


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list, list]:
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def _loader(dataset, batch_size: int, workers: int, sampler=None, device: torch.device | None = None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_detection,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
    )


@contextlib.contextmanager
def _step_rng(seed: int, it: int, device: torch.device):
    """Seeds torch's global generators from ``(seed, it)`` for one step and restores them afterwards.

    The RPN and RoI samplers draw from the global generators; without this a resumed run would draw other
    samples than the uninterrupted one, and the caller's random state would depend on the step count.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence([seed, it]).generate_state(1)[0]))
        yield


def _train_step(model, images, targets, optimizer, scaler, use_amp: bool, it: int) -> float:
    with torch.autocast(images[0].device.type, dtype=torch.float16, enabled=use_amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        parts = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
        raise NonFiniteLossError(f"detection loss is {loss.item()} at iteration {it} ({parts}); lower the lr")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped by the scaler after an fp16 overflow, hence torch's scheduler warning
    scaler.update()
    return float(loss.item())


def train_detector(
    model: torch.nn.Module,
    dataset: DetectionDataset,
    config: DetectionConfig,
    checkpoint: str | os.PathLike,
    resume: bool = True,
    progress: bool = True,
    run_key: dict[str, Any] | None = None,
) -> TrainStats:
    """Fine-tunes ``model`` on ``dataset`` and writes ``checkpoint`` (atomically) at each epoch end and at the end.

    With ``resume`` and an existing ``checkpoint`` of the same settings (``config``, the training set's
    size and ``run_key``, e.g. the backbone weights' path), training continues where it stopped (a
    finished run trains no further). Shuffling and flips depend only on
    ``(seed, epoch, index)``, so a resumed run sees the batches the uninterrupted run would have seen.

    Raises:
        ValueError: The checkpoint was written with other settings.
        NonFiniteLossError: The loss became NaN or infinite.
    """
    device = _device(config.device)
    model.to(device)
    batch = config.batch_size
    steps_per_epoch = -(-len(dataset) // batch)
    if steps_per_epoch == 0:
        raise ValueError("the training set is empty")
    total = config.epochs * steps_per_epoch
    if config.max_iters:
        total = min(total, config.max_iters)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.base_lr(), momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        detection_lr_lambda(total, config.warmup_iters, config.warmup_factor, config.lr_steps, config.lr_gamma),
    )
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    sampler = EpochSampler(len(dataset), seed=config.seed)
    it, epoch, done_in_epoch, skipped = 0, 0, 0, 0
    checkpoint = Path(checkpoint)
    key = json.dumps({**config.resume_key(), "train_images": len(dataset), **(run_key or {})}, sort_keys=True)

    def save() -> None:
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "iteration": it,
                "epoch": epoch,
                "batches_done_in_epoch": done_in_epoch,
                "skipped": skipped,
                "config": key,
            },
            checkpoint,
        )

    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("config") != key:
            raise ValueError(f"{checkpoint} was written with other settings; use another --out or --no-resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        it, epoch, done_in_epoch, skipped = (
            int(state[k]) for k in ("iteration", "epoch", "batches_done_in_epoch", "skipped")
        )
        logger.info("resumed detection fine-tuning from %s at iteration %d", checkpoint, it)

    model.train()
    bar = tqdm(total=total, initial=it, disable=not progress, unit="it", dynamic_ncols=True, desc="fine-tune")
    last_loss, images, t0 = float("nan"), 0, time.perf_counter()
    try:
        while it < total:
            sampler.set_epoch(epoch, start=done_in_epoch * batch)
            dataset.set_epoch(epoch)
            for imgs, targets, dropped in _loader(dataset, batch, config.workers, sampler, device):
                skipped += dropped
                if imgs:  # empty when every image of the batch was unreadable
                    with _step_rng(config.seed, it, device):
                        last_loss = _train_step(
                            model, *_to_device(imgs, targets, device), optimizer, scaler, use_amp, it
                        )
                    images += len(imgs)
                scheduler.step()
                it += 1
                done_in_epoch += 1
                rate = images / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}", img_s=f"{rate:.2f}"
                )
                if done_in_epoch >= steps_per_epoch:
                    epoch, done_in_epoch = epoch + 1, 0
                    save()
                elif it >= total or (config.checkpoint_every and it % config.checkpoint_every == 0):
                    save()
                if it >= total:
                    break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if not checkpoint.is_file():
        save()
    return TrainStats(it, last_loss, images / seconds if images else 0.0, skipped, seconds)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: DetectionDataset,
    batch_size: int = 4,
    workers: int = 0,
    device: str = "auto",
    amp: bool = True,
    progress: bool = True,
) -> tuple[Detections, np.ndarray, int]:
    """Runs the detector over ``dataset``.

    Returns:
        The detections (class indices ``0..C-1``, boxes in pixels of the original images), the ids of the
        images that were run (``Records.image_ids``), and the number of unreadable images skipped.
    """
    dev = _device(device)
    model.to(dev).eval()
    use_amp = amp and dev.type == "cuda"
    ids = dataset.records.image_ids
    parts, seen, skipped = [], [], 0
    bar = tqdm(total=len(dataset), disable=not progress, unit="img", dynamic_ncols=True, desc="evaluate")
    for imgs, targets, dropped in _loader(dataset, batch_size, workers, device=dev):
        skipped += dropped
        if imgs:
            imgs, _ = _to_device(imgs, [], dev)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                outputs = model(imgs)
            for target, out in zip(targets, outputs, strict=True):
                image_id = int(ids[int(target["index"])])
                seen.append(image_id)
                n = len(out["scores"])
                parts.append(
                    Detections(
                        np.full(n, image_id, np.int64),
                        out["boxes"].float().cpu().numpy(),
                        out["scores"].float().cpu().numpy(),
                        out["labels"].cpu().numpy().astype(np.int64) - 1,
                    )
                )
        bar.update(len(imgs) + dropped)
    bar.close()
    return Detections.concatenate(parts), np.array(seen, np.int64), skipped


def run_detection(
    train_records: Records,
    test_records: Records,
    config: DetectionConfig,
    out: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    test_annotations_json: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
) -> DetectionResult:
    """Fine-tunes a detector on ``train_records`` and scores it on ``test_records``.

    Args:
        train_records: Training set (its classes are the detector's classes).
        test_records: Test set; classes are matched by name.
        config: Run settings.
        out: Folder of the checkpoint (``detector.pt``) and ``metrics.json``.
        weights: An objcrop checkpoint or a torchvision ``state_dict`` of the backbone; ``None`` trains
            from a random initialisation (the baseline).
        test_annotations_json: The test set's original COCO JSON, scored with the official protocol
            (crowd regions ignored, segment areas); ``None`` scores against the boxes of ``test_records``.
        resume: Continue from ``out/detector.pt`` when it exists.
        progress: Show tqdm bars.
    """
    out = Path(out)
    state, arch = (None, None) if weights is None else backbone_weights(weights)
    if config.arch is not None and arch is not None and config.arch != arch:
        raise ValueError(f"{weights} holds a {arch} backbone, not {config.arch}")
    config = dataclasses.replace(config, arch=config.arch or arch or "resnet50")
    if weights is None and config.norm == "frozen":
        logger.warning(
            "random backbone with frozen BatchNorm: its layers are not normalized at all; the usual from-scratch "
            "baseline trains all layers with BatchNorm (norm='bn', trainable_layers=5)"
        )
    torch.manual_seed(config.seed)
    model = build_detector(
        config.arch,
        train_records.num_classes,
        weights=state,
        trainable_layers=config.trainable_layers,
        norm=config.norm,
        min_size=config.min_size,
        max_size=config.max_size,
        proposals_train=config.proposals_train,
        proposals_test=config.proposals_test,
        rois_per_image=config.rois_per_image,
        weights_source=f"weights in {weights}",
        box_head=config.box_head,
        anchor_sizes=config.anchor_sizes,
        fpn_channels=config.fpn_channels,
    )
    if test_annotations_json is not None:
        gt = ground_truth_from_json(test_annotations_json, train_records.class_names)
    else:
        gt = ground_truth_from_records(test_records, train_records.class_names)

    train_set = DetectionDataset(train_records, hflip_prob=config.hflip_prob, seed=config.seed)
    run_key = {"weights": None if weights is None else os.path.abspath(weights), "classes": train_records.class_names}
    stats = train_detector(model, train_set, config, out / CHECKPOINT_NAME, resume, progress, run_key)
    t0 = time.perf_counter()
    detections, seen, skipped = predict(
        model,
        DetectionDataset(test_records),
        config.eval_batch_size,
        config.workers,
        config.device,
        config.amp,
        progress,
    )
    eval_rate = len(seen) / max(time.perf_counter() - t0, 1e-9)
    if not len(seen):
        raise ValueError("no test image could be read")
    metrics = coco_evaluate(gt, detections, image_ids=seen)
    result = DetectionResult(metrics, stats, len(seen), skipped, eval_rate, str(out / CHECKPOINT_NAME))
    _write_json(out / METRICS_NAME, {**result.to_dict(), "config": dataclasses.asdict(config)})
    logger.info("detection: %s", ", ".join(f"{k} {metrics[k]:.4f}" for k in METRICS))
    return result


def _write_json(path: Path, payload: dict) -> None:
    write_json_atomic(path, payload, indent=2)
