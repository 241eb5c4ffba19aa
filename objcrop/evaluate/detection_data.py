"""Detection fine-tuning data: :class:`Records` as torchvision detection samples.

A sample is an upright RGB ``uint8`` image tensor ``[3, H, W]`` (the model normalizes and resizes)
and a target ``{"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N] in 1..C}`` (0 is the
background for torchvision). Images without boxes are kept as negatives.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from objcrop.data.images import ImageReadError, load_image
from objcrop.data.records import Records

__all__ = ["DetectionBatch", "DetectionDataset", "collate_detection"]

logger = logging.getLogger(__name__)

DetectionSample = tuple[torch.Tensor, dict[str, torch.Tensor]]
DetectionBatch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], int]


class DetectionDataset(Dataset):
    """Images and boxes of ``records``, optionally flipped horizontally.

    Args:
        records: The dataset; box labels ``0..C-1`` become target labels ``1..C``.
        hflip_prob: Probability of a horizontal flip of image and boxes (0 for evaluation).
        seed: Seed of the flips; a sample's flip depends only on ``(seed, epoch, index)``.

    An unreadable image, or one whose decoded size differs from the annotation's, gives ``None``
    (logged with its path); :func:`collate_detection` drops it and counts it.
    """

    def __init__(self, records: Records, hflip_prob: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.records = records
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionSample | None:
        path = self.records.path(index)
        try:
            image = load_image(path)
        except (FileNotFoundError, ImageReadError) as err:
            logger.warning("skipping unreadable image %s: %s", path, err)
            return None
        width, height = self.records.size(index)
        if image.size != (width, height):
            logger.warning(
                "skipping %s: decoded size %dx%d differs from the annotated %dx%d", path, *image.size, width, height
            )
            return None
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        boxes = self.records.boxes_of(index).copy()
        if self.hflip_prob > 0 and np.random.default_rng([self.seed, self.epoch, index]).random() < self.hflip_prob:
            pixels = pixels.flip(-1)
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        target = {
            "boxes": torch.from_numpy(boxes).reshape(-1, 4),
            "labels": torch.from_numpy(self.records.box_labels_of(index).astype(np.int64) + 1),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        return pixels.contiguous(), target


def collate_detection(samples: list[DetectionSample | None]) -> DetectionBatch:
    """Lists of images and targets (sizes differ), and the number of unreadable images dropped."""
    kept = [s for s in samples if s is not None]
    return [s[0] for s in kept], [s[1] for s in kept], len(samples) - len(kept)
