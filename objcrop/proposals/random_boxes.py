"""Random boxes: the "random" control of the proposal benchmark.

Boxes are drawn like torchvision's ``RandomResizedCrop`` draws crops, so object-aware cropping
with random "proposals" tells how much the proposals themselves matter.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

__all__ = ["RandomBoxProposer", "random_resized_crop_boxes"]


def random_resized_crop_boxes(
    n: int,
    width: float,
    height: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> np.ndarray:
    """Draws ``n`` RandomResizedCrop boxes in a ``width x height`` image, vectorized.

    Each box covers a fraction of the image area drawn from ``scale`` with an aspect ratio
    (w / h) drawn log-uniformly from ``ratio``; a draw that does not fit is retried up to
    ``attempts`` times, after which the box is the largest centred one whose ratio lies in
    ``ratio`` (torchvision's rule).

    Returns:
        Float32 ``[n, 4]`` xyxy boxes.
    """
    areas = width * height * rng.uniform(scale[0], scale[1], size=(n, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts)))
    w = np.sqrt(areas * aspect)
    h = np.sqrt(areas / aspect)
    fits = (w <= width) & (h <= height)
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], fits[rows, first]

    image_ratio = width / height
    if image_ratio < ratio[0]:
        fw, fh = width, width / ratio[0]
    elif image_ratio > ratio[1]:
        fw, fh = height * ratio[1], height
    else:
        fw, fh = width, height
    w = np.where(found, w, fw)
    h = np.where(found, h, fh)
    u = rng.uniform(size=(n, 2))
    x1 = np.where(found, u[:, 0] * (width - w), (width - w) / 2)
    y1 = np.where(found, u[:, 1] * (height - h), (height - h) / 2)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


class RandomBoxProposer:
    """Proposes ``n`` random RandomResizedCrop-style boxes.

    The boxes depend only on the image content and ``seed``: the same image gives the same boxes
    in any worker, any order, any run.

    Args:
        n: Boxes per image.
        scale: Range of the box area as a fraction of the image area.
        ratio: Range of the box aspect ratio (w / h).
        seed: Seed mixed with the hash of the pixels.
    """

    def __init__(
        self,
        n: int = 1000,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.n = int(n)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"RandomBoxProposer(n={self.n}, scale={self.scale}, ratio={self.ratio}, seed={self.seed})"

    def rng_for(self, image: np.ndarray) -> np.random.Generator:
        """The generator for ``image``: seeded by ``seed`` and a hash of the pixels and shape."""
        image = np.ascontiguousarray(image)
        digest = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.shape).encode()[:16])
        words = np.frombuffer(digest.digest(), dtype=np.uint32)
        return np.random.default_rng([self.seed, *words.tolist()])

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(boxes float32 [n, 4], scores float32 [n])``; every score is 1 (no ranking)."""
        height, width = image.shape[:2]
        boxes = random_resized_crop_boxes(self.n, width, height, self.scale, self.ratio, self.rng_for(image))
        return boxes, np.ones(self.n, dtype=np.float32)
