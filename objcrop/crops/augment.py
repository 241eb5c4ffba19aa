"""Augmentation presets applied to each view after it was cut and resized.

The presets follow MoCo-v2 and BYOL but leave out the crop: the view-pair transform already cut
the crop box and resized it to the view size. They are ``torchvision.transforms.v2`` pipelines
and accept PIL images as well as tensors (``uint8`` or float in ``[0, 1]``), and return
normalized float32 tensors. Given a ``size``, their first step resizes inputs of another size to
``size x size`` (squashing them); views from the view-pair transform already have it, and the step
does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from PIL import ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RandomGaussianBlur",
    "RandomSolarize",
    "moco_v2_view_transform",
    "byol_view_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _max_value(inpt: Any) -> float:
    if isinstance(inpt, PIL.Image.Image):
        return 255.0
    if inpt.is_floating_point():
        return 1.0
    return float(torch.iinfo(inpt.dtype).max)


class RandomGaussianBlur(v2.Transform):
    """Gaussian blur with a random sigma, applied with probability ``p``.

    PIL images are blurred with ``PIL.ImageFilter.GaussianBlur`` as in the original MoCo code,
    several times faster than torchvision's blur on PIL images. Tensors are blurred with
    ``v2.functional.gaussian_blur`` and a kernel that covers three sigmas on each side.

    Args:
        sigma: Range the standard deviation is drawn from uniformly, in pixels.
        p: Probability of blurring.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {sigma}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draws whether to blur (with probability ``p``) and the sigma."""
        if torch.rand(1).item() >= self.p:
            return {"sigma": None}
        return {"sigma": torch.empty(1).uniform_(*self.sigma).item()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Blurs ``inpt`` (a PIL image or a tensor) with the drawn sigma, or returns it as it is."""
        sigma = params["sigma"]
        if sigma is None:
            return inpt
        if isinstance(inpt, PIL.Image.Image):
            return inpt.filter(ImageFilter.GaussianBlur(radius=sigma))
        kernel = 2 * math.ceil(3 * sigma) + 1
        return self._call_kernel(F.gaussian_blur, inpt, [kernel, kernel], [sigma, sigma])


class RandomSolarize(v2.Transform):
    """Inverts the pixels at or above ``threshold`` times the dtype's maximum, with probability ``p``.

    Unlike ``v2.RandomSolarize`` the threshold is a fraction, so one preset serves PIL images,
    ``uint8`` tensors and float tensors (BYOL's 0.5 is 128 for 8-bit pixels).
    """

    def __init__(self, threshold: float = 0.5, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a fraction of the maximum pixel value, got {threshold}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.threshold = float(threshold)
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draws whether to solarize (with probability ``p``)."""
        return {"apply": torch.rand(1).item() < self.p}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Solarizes ``inpt`` above ``threshold`` of its value range when drawn, else returns it as it is."""
        if not params["apply"]:
            return inpt
        return self._call_kernel(F.solarize, inpt, threshold=self.threshold * _max_value(inpt))


def _to_size(size: int | None) -> list[v2.Transform]:
    return [] if size is None else [v2.Resize((size, size), antialias=True)]


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def moco_v2_view_transform(
    size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur_prob: float = 0.5,
) -> v2.Compose:
    """MoCo-v2's augmentations of one view, without the crop.

    Colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2, Gaussian blur with
    sigma in [0.1, 2] and p=``blur_prob``, horizontal flip, then a normalized float tensor.

    Args:
        size: Side of the output views; ``None`` (the default) keeps the input size.
        mean: Normalization mean per channel.
        std: Normalization standard deviation per channel.
        blur_prob: Probability of the Gaussian blur.
    """
    return v2.Compose(
        [
            *_to_size(size),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            RandomGaussianBlur((0.1, 2.0), p=blur_prob),
            v2.RandomHorizontalFlip(),
            *_to_normalized_tensor(mean, std),
        ]
    )


def _byol_view(
    size: int | None, blur_prob: float, solarize_prob: float, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    return v2.Compose(
        [
            *_to_size(size),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            RandomGaussianBlur((0.1, 2.0), p=blur_prob),
            RandomSolarize(0.5, p=solarize_prob),
            *_to_normalized_tensor(mean, std),
        ]
    )


def byol_view_transforms(
    size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[v2.Compose, v2.Compose]:
    """BYOL's asymmetric augmentations of the two views, without the crop.

    Both views: flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale with p=0.2.
    View 1 is always blurred and never solarized; view 2 is blurred with p=0.1 and solarized
    with p=0.2. ``size``, ``mean`` and ``std`` as in :func:`moco_v2_view_transform`.
    """
    return _byol_view(size, 1.0, 0.0, mean, std), _byol_view(size, 0.1, 0.2, mean, std)
