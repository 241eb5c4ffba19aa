"""Real object photos ("sprites") pasted into ``objcrop synth`` scenes.

A sprite folder holds one sub-folder per class (``DIR/<class>/*.jpg``), e.g. CIFAR-10 test
images. Sprites with an alpha channel (RGBA PNG) keep it; the others get a soft-edged
rectangle so that they blend into the background instead of ending in a hard seam.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from objcrop.data.synth_backgrounds import IMAGE_EXTENSIONS
from objcrop.data.synth_shapes import Patch

__all__ = ["SpriteBank", "read_sprite", "soft_rectangle"]

log = logging.getLogger(__name__)


def read_sprite(path: str) -> np.ndarray:
    """Decodes a sprite to uint8 RGB ``[h, w, 3]`` or RGBA ``[h, w, 4]``."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot decode sprite {path}")
    if image.dtype != np.uint8:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def soft_rectangle(width: int, height: int, feather: float) -> np.ndarray:
    """Float32 ``[height, width]`` coverage: 1 inside, ramping to 0 over ``feather`` pixels at the border."""

    def ramp(n: int) -> np.ndarray:
        centres = np.arange(n, dtype=np.float32) + 0.5
        return np.clip(np.minimum(centres, n - centres) / max(feather, 1e-6), 0, 1)

    return ramp(height)[:, None] * ramp(width)[None, :]


class SpriteBank:
    """Object photos grouped by class.

    Args:
        images: Uint8 RGB or RGBA sprites.
        labels: Class index of each sprite.
        class_names: Name of each class index.
        feather: Soft-edge width as a fraction of the pasted sprite's shorter side (sprites without alpha).
    """

    def __init__(self, images: list[np.ndarray], labels, class_names: list[str], feather: float = 0.15) -> None:
        self.images = list(images)
        self.labels = np.asarray(labels, dtype=np.int32).reshape(-1)
        self.class_names = tuple(class_names)
        self.feather = float(feather)
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels disagree")
        if not self.images:
            raise ValueError("no sprites given")
        present = np.unique(self.labels)
        if present.min() < 0 or present.max() >= len(self.class_names):
            raise ValueError("sprite labels out of range of class_names")
        # Indices of each class's sprites, flat with offsets: classes are drawn uniformly.
        self._order = np.argsort(self.labels, kind="stable")
        self._offsets = np.searchsorted(self.labels[self._order], np.arange(len(self.class_names) + 1))
        self._classes = present

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, feather: float = 0.15) -> SpriteBank:
        """Loads ``folder/<class>/<image>``; classes are the sub-folder names in sorted order."""
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"not a folder: {root}")
        names, images, labels = [], [], []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                log.warning("sprite class folder %s holds no images; skipped", sub)
                continue
            for f in files:
                images.append(read_sprite(str(f)))
                labels.append(len(names))
            names.append(sub.name)
        if not names:
            raise ValueError(f"no sprite classes (sub-folders with images) under {root}")
        return cls(images, labels, names, feather)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, rng: np.random.Generator, longest_side: float) -> Patch:
        """A random sprite of a uniformly drawn class, scaled so that its longer side is
        ``longest_side`` pixels, with aspect jitter, a random horizontal flip and a brightness jitter."""
        label = int(self._classes[rng.integers(len(self._classes))])
        lo, hi = self._offsets[label], self._offsets[label + 1]
        sprite = self.images[int(self._order[rng.integers(lo, hi)])]
        h0, w0 = sprite.shape[:2]
        w_rel, h_rel = w0 * rng.uniform(0.85, 1.15), float(h0)
        scale = float(longest_side) / max(w_rel, h_rel)
        width, height = max(2, int(round(w_rel * scale))), max(2, int(round(h_rel * scale)))
        interp = cv2.INTER_AREA if width * height < w0 * h0 else cv2.INTER_LINEAR
        pixels = cv2.resize(sprite, (width, height), interpolation=interp).astype(np.float32)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        rgb = np.clip(pixels[..., :3] * rng.uniform(0.85, 1.15), 0, 255)
        if sprite.shape[2] == 4:
            alpha = pixels[..., 3] / 255.0
        else:
            alpha = soft_rectangle(width, height, self.feather * min(width, height))
        box = np.array([0, 0, width, height], dtype=np.float32)
        return Patch(np.ascontiguousarray(rgb), np.ascontiguousarray(alpha, dtype=np.float32), box, label)
