"""The view-pair transform: from an image and its proposals to two augmented views.

:class:`ViewPairTransform` is a plain callable ``(image, proposals) -> (views, kinds)``. It asks
a :class:`~objcrop.crops.policies.ViewPairPolicy` for two crop boxes, cuts each box resized to
``size x size`` in one step, and applies the view augmentations. Being a plain callable, it is
the ``transform`` of a torchvision dataset whose samples are ``(image, proposals)``, or a
lightly-style multi-view transform (it returns a list of views).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import get_worker_info
from torchvision.transforms import v2

from objcrop.crops.augment import moco_v2_view_transform
from objcrop.crops.policies import ViewPairPolicy

__all__ = ["ViewPairStats", "ViewPairTransform", "image_size", "resized_crop"]

logger = logging.getLogger(__name__)

ViewTransform = Callable[[Any], Any]


def image_size(image: PIL.Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a ``[..., C, H, W]`` tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.size
    if isinstance(image, torch.Tensor) and image.ndim >= 3:
        return int(image.shape[-1]), int(image.shape[-2])
    raise TypeError(f"expected a PIL image or a [C, H, W] tensor, got {type(image).__name__}")


def resized_crop(image: PIL.Image.Image | torch.Tensor, box: Sequence[float], size: int) -> Any:
    """Cuts the xyxy pixel ``box`` out of ``image`` resized to ``size x size`` (bilinear, antialiased).

    PIL images are resampled straight from the float box, without resizing an intermediate crop.
    Tensors (and ``tv_tensors.Image``) are cropped at the box rounded to whole pixels.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if isinstance(image, PIL.Image.Image):
        return image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=(x1, y1, x2, y2))
    width, height = image_size(image)
    left = min(max(int(round(x1)), 0), width - 1)
    top = min(max(int(round(y1)), 0), height - 1)
    crop_w = min(max(int(round(x2)) - left, 1), width - left)
    crop_h = min(max(int(round(y2)) - top, 1), height - top)
    return v2.functional.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True)


@dataclass
class ViewPairStats:
    """Counters of one process: samples drawn and samples whose policy fell back to scene crops."""

    samples: int = 0
    fallbacks: int = 0

    @property
    def fallback_rate(self) -> float:
        """The share of samples whose policy found no usable proposal (0 before any sample)."""
        return self.fallbacks / self.samples if self.samples else 0.0


class ViewPairTransform:
    """Turns ``(image, proposals)`` into two augmented views and their kinds.

    Args:
        policy: Chooses the two crop boxes (geometry only).
        size: Side of the square views in pixels.
        view_transforms: Augmentation of each view after cutting, or a pair (view 1, view 2)
            for asymmetric methods such as BYOL. Defaults to the MoCo-v2 preset.
        seed: Seed of the crop generator in the main process. DataLoader workers seed theirs from
            ``get_worker_info().seed``, which differs per worker and epoch and follows
            ``torch.manual_seed``.
        warn_every: After the first fallback is logged, every ``warn_every``-th one is logged.

    Returns (from ``__call__``):
        ``(views, kinds)``: a list of two views and a tuple of two view kinds from
        :data:`~objcrop.crops.policies.VIEW_KINDS`.
    """

    def __init__(
        self,
        policy: ViewPairPolicy,
        size: int = 224,
        view_transforms: ViewTransform | Sequence[ViewTransform] | None = None,
        seed: int | None = None,
        warn_every: int = 1000,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if view_transforms is None:
            view_transforms = moco_v2_view_transform(size)
        if callable(view_transforms):
            view_transforms = (view_transforms, view_transforms)
        view_transforms = tuple(view_transforms)
        if len(view_transforms) != 2 or not all(callable(t) for t in view_transforms):
            raise ValueError("view_transforms must be one transform or a pair of transforms")
        self.policy = policy
        self.size = int(size)
        self.view_transforms = view_transforms
        self.seed = seed
        self.warn_every = max(int(warn_every), 1)
        self.stats = ViewPairStats()
        self._rng: np.random.Generator | None = None
        self._rng_key: int | None = None

    def __repr__(self) -> str:
        return f"ViewPairTransform({self.policy!r}, size={self.size})"

    @property
    def rng(self) -> np.random.Generator:
        """This process's crop generator, re-seeded when the transform lands in a new DataLoader worker."""
        info = get_worker_info()
        key = None if info is None else info.seed
        if self._rng is None or key != self._rng_key:
            self._rng = np.random.default_rng(self.seed if info is None else info.seed)
            self._rng_key = key
        return self._rng

    def cut_views(self, image: PIL.Image.Image | torch.Tensor, crops: np.ndarray) -> list[Any]:
        """Cuts the two crop boxes resized to ``size`` and augments them."""
        return [t(resized_crop(image, box, self.size)) for t, box in zip(self.view_transforms, crops, strict=True)]

    def __call__(
        self,
        image: PIL.Image.Image | torch.Tensor,
        proposals: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> tuple[list[Any], tuple[str, str]]:
        """The two augmented views of ``image`` and their kinds, from the policy's geometry on ``proposals``."""
        width, height = image_size(image)
        pair = self.policy.sample(width, height, proposals, self.rng if rng is None else rng)
        self.count(pair.fallback)
        return self.cut_views(image, pair.crops), pair.kinds

    def count(self, fallback: bool) -> None:
        """Counts one sample (and logs fallbacks: they are never silent)."""
        self.stats.samples += 1
        if not fallback:
            return
        self.stats.fallbacks += 1
        if self.stats.fallbacks == 1 or self.stats.fallbacks % self.warn_every == 0:
            logger.warning(
                "policy %s found no usable proposal in %d of %d samples so far (this process); "
                "those samples use two scene views",
                self.policy.name,
                self.stats.fallbacks,
                self.stats.samples,
            )
