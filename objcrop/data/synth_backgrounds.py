"""Scene backgrounds for ``objcrop synth``: procedural clutter, or random crops of real photos.

The procedural background is a smooth colour field with a gradient, overlaid with translucent
lines, blobs, polygons and patches of the same textures the objects wear, so that neither
texture nor edges alone give an object away.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import cv2
import numpy as np

from objcrop.data.synth_shapes import TEXTURES, texture_mask

__all__ = ["IMAGE_EXTENSIONS", "BackgroundBank", "render_background", "list_images", "read_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _random_colours(rng: np.random.Generator, n: int, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """``[n, 3]`` RGB colours in 0..255 of uniformly random hue and the given saturation and value ranges."""
    hsv = np.stack([rng.uniform(0, 360, n), rng.uniform(*sat, n), rng.uniform(*val, n)], axis=1).astype(np.float32)
    return cv2.cvtColor(hsv[:, None, :], cv2.COLOR_HSV2RGB)[:, 0] * 255.0


def _colour_field(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = int(rng.integers(2, 7))
    grid = _random_colours(rng, cells * cells, sat=(0.0, 0.35), val=(0.3, 0.85)).reshape(cells, cells, 3)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (math.cos(angle) * xx + math.sin(angle) * yy) * rng.uniform(0, 60)
    return field + ramp[..., None]


def _draw_primitive(layer: np.ndarray, rng: np.random.Generator, colour: tuple[float, ...]) -> None:
    size = layer.shape[0]
    kind = int(rng.integers(4))
    if kind == 0:  # a line across a good part of the image
        p, q = rng.integers(-size // 4, size + size // 4, size=(2, 2))
        cv2.line(layer, tuple(map(int, p)), tuple(map(int, q)), colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    elif kind == 1:  # an ellipse, filled or outlined
        centre = tuple(int(c) for c in rng.integers(0, size, size=2))
        axes = tuple(int(a) for a in rng.integers(2, max(3, size // 4), size=2))
        thickness = -1 if rng.random() < 0.5 else int(rng.integers(1, 3))
        cv2.ellipse(layer, centre, axes, rng.uniform(0, 180), 0, 360, colour, thickness, cv2.LINE_AA)
    elif kind == 2:  # an irregular polygon
        centre = rng.uniform(0, size, size=2)
        n = int(rng.integers(3, 8))
        t = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        r = rng.uniform(0.03, 0.2, size=n) * size
        pts = np.stack([centre[0] + r * np.cos(t), centre[1] + r * np.sin(t)], axis=1)
        cv2.fillPoly(layer, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)
    else:  # a wavy polyline
        n = int(rng.integers(3, 7))
        pts = np.cumsum(rng.normal(0, size / 6, size=(n, 2)), axis=0) + rng.uniform(0, size, size=2)
        cv2.polylines(layer, [np.round(pts).astype(np.int32)], False, colour, int(rng.integers(1, 3)), cv2.LINE_AA)


def _clutter(image: np.ndarray, rng: np.random.Generator) -> None:
    size = image.shape[0]
    for _ in range(int(rng.integers(2, 4))):  # a few translucent layers of shapes
        layer = image.copy()
        for colour in _random_colours(rng, int(rng.integers(3, 9)), sat=(0.0, 0.6), val=(0.15, 0.95)):
            _draw_primitive(layer, rng, tuple(float(c) for c in colour))
        image += rng.uniform(0.15, 0.45) * (layer - image)
    for _ in range(int(rng.integers(0, 3))):  # textured blobs, so texture alone does not mean "object"
        axes = rng.integers(size // 16 + 1, size // 4 + 2, size=2)
        cx, cy = rng.integers(0, size, size=2)
        reach = int(axes.max()) + 1
        x0, y0 = max(int(cx) - reach, 0), max(int(cy) - reach, 0)
        window = image[y0 : int(cy) + reach + 1, x0 : int(cx) + reach + 1]
        region = np.zeros(window.shape[:2], dtype=np.float32)
        centre = (int(cx) - x0, int(cy) - y0)
        cv2.ellipse(region, centre, tuple(int(a) for a in axes), rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
        angle = rng.uniform(0, 2 * np.pi)
        x = np.arange(region.shape[1], dtype=np.float32) - centre[0]
        y = np.arange(region.shape[0], dtype=np.float32)[:, None] - centre[1]
        u, v = math.cos(angle) * x + math.sin(angle) * y, -math.sin(angle) * x + math.cos(angle) * y
        pattern = texture_mask(TEXTURES[int(rng.integers(len(TEXTURES)))], u, v, rng.uniform(3, size / 10 + 3), rng)
        colour = _random_colours(rng, 1, sat=(0.0, 0.7), val=(0.2, 0.9))[0]
        window += (region * pattern * rng.uniform(0.15, 0.4))[..., None] * (colour - window)


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered procedural background, float32 ``[size, size, 3]`` RGB in 0..255."""
    image = _colour_field(rng, size)
    _clutter(image, rng)
    return np.clip(image, 0, 255)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursively), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@functools.lru_cache(maxsize=256)
def read_rgb(path: str) -> np.ndarray:
    """Decodes an image file to uint8 RGB (EXIF orientation applied); cached per process."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class BackgroundBank:
    """Real photos used as backgrounds: each scene gets a random square crop of one of them.

    Args:
        paths: Image files.
        min_crop: Smallest crop side as a fraction of the photo's shorter side.
    """

    def __init__(self, paths: list[str], min_crop: float = 0.35) -> None:
        if not paths:
            raise ValueError("no background images given")
        if not 0 < min_crop <= 1:
            raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")
        self.paths = list(paths)
        self.min_crop = float(min_crop)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, min_crop: float = 0.35) -> BackgroundBank:
        """A bank of every image under ``folder`` (``min_crop``: smallest crop side, a fraction of the shorter side)."""
        paths = list_images(folder)
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
        return cls(paths, min_crop)

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A random square crop of a random photo, flipped half of the time, float32 ``[size, size, 3]``."""
        photo = read_rgb(self.paths[int(rng.integers(len(self.paths)))])
        h, w = photo.shape[:2]
        side = max(1, int(round(min(h, w) * rng.uniform(self.min_crop, 1.0))))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[y0 : y0 + side, x0 : x0 + side]
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (size, size), interpolation=interp)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return crop.astype(np.float32)
