"""The loader side of the device path: decoded images, crop boxes and augmentation parameters, no pixels made.

:class:`DeviceViewDataset` is :class:`~objcrop.crops.dataset.ObjectAwareDataset` with the pixel work left out:
each sample is the decoded ``uint8`` image, the policy's two crop boxes and the two views' augmentation
parameters, drawn on the CPU; :class:`~objcrop.crops.device_views.DeviceViewMaker` makes the views from a
batch of them on the training device. The geometry is the loader path's exactly: with a seed, the crop boxes
come from ``np.random.default_rng([seed, epoch, index])`` through the same policy call, and the
augmentation parameters from a generator seeded by that generator's next draw (the draw that seeds the loader
path's torchvision augmentations), so they too are a function of ``(seed, epoch, index)``. Unusable records
are skipped, counted and logged as by the loader path (the same scan, wrapping around).

``augment_on`` picks the path: ``loader`` (views made in the DataLoader workers), ``device`` (this dataset),
``auto`` (device when training on CUDA, else loader); see :func:`resolve_augment_on`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from objcrop import registry
from objcrop.crops.dataset import BoxSource, ObjectAwareDataset
from objcrop.crops.decode import decode_image, pad_images, resolve_decoder
from objcrop.crops.device_views import AUGMENT_PRESETS, AugmentPreset, DeviceViewMaker
from objcrop.crops.policies import ViewPairPolicy
from objcrop.data.images import ImageReadError
from objcrop.data.records import Records

__all__ = ["AUGMENT_ON", "DeviceViewDataset", "collate_images", "resolve_augment_on"]

logger = logging.getLogger("objcrop.crops.dataset")  # the loader path's logger: one place for skipped records

AUGMENT_ON = registry.AUGMENT_ON


def resolve_augment_on(choice: str, device: torch.device | str | None = None) -> str:
    """``loader`` or ``device``: where views are made for ``choice`` when training on ``device``.

    ``auto`` means ``device`` on CUDA and ``loader`` elsewhere, including when no training device is known
    (``device=None``: a dataset built outside the trainer, for Lightning say).
    """
    if choice not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "device" if device is not None and torch.device(device).type == "cuda" else "loader"


class DeviceViewDataset(ObjectAwareDataset):
    """Decoded images and their view geometry, for views made on the training device.

    Args:
        records: The images (paths and sizes).
        store: Proposals of each record.
        policy: Chooses the two crop boxes.
        augment: Augmentation preset (name in :data:`~objcrop.crops.device_views.AUGMENT_PRESETS` or an
            :class:`~objcrop.crops.device_views.AugmentPreset`) whose parameters are drawn here.
        size: Side of the square views (used by :meth:`view_maker`).
        seed: As for :class:`~objcrop.crops.dataset.ObjectAwareDataset`: with a seed, every sample is a
            function of ``(seed, epoch, index)``.
        max_tries: Length of a run of bad records that is reported as a run.
        decoder: JPEG decoder, one of :data:`~objcrop.crops.decode.DECODERS`.

    Returns (from ``__getitem__``):
        A dict with ``image`` (``uint8`` ``[3, H, W]``), ``crops`` (float32 ``[2, 4]`` xyxy pixels),
        ``params`` (float32 ``[2, P]``, see :data:`~objcrop.crops.device_views.PARAM_NAMES`), ``kinds``,
        ``index``, ``replaced`` and ``fallback`` as the loader path's samples.
    """

    def __init__(
        self,
        records: Records,
        store: BoxSource,
        policy: ViewPairPolicy,
        augment: str | AugmentPreset = "moco-v2",
        size: int = 224,
        seed: int | None = None,
        max_tries: int = 10,
        decoder: str = "auto",
    ) -> None:
        if isinstance(augment, str):
            if augment not in AUGMENT_PRESETS:
                raise ValueError(f"unknown augmentation preset {augment!r}; choose from {', '.join(AUGMENT_PRESETS)}")
            augment = AUGMENT_PRESETS[augment]
        # A no-op per-view transform: the parent's pixel pipeline is never run on this path.
        super().__init__(records, store, policy, transform=_unused, size=size, seed=seed, max_tries=max_tries)
        self.preset = augment
        self.size = int(size)
        self.decoder = resolve_decoder(decoder)

    def __repr__(self) -> str:
        return f"DeviceViewDataset({len(self)} images, {self.policy!r}, augment={self.preset.name!r})"

    def view_maker(self, channels_last: bool = True) -> DeviceViewMaker:
        """The view maker that turns this dataset's batches into views."""
        return DeviceViewMaker(self.size, self.preset, channels_last=channels_last)

    @staticmethod
    def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The DataLoader's ``collate_fn`` for this dataset: see :func:`collate_images`."""
        return collate_images(samples)

    def _load(self, i: int) -> torch.Tensor | None:
        path = self.records.path(i)
        try:
            image = decode_image(path, self.decoder)
        except (ImageReadError, OSError) as err:
            reason = str(err)
        else:
            expected = self.records.size(i)
            decoded = (int(image.shape[2]), int(image.shape[1]))
            if decoded == expected:
                return image
            reason = f"decoded size {decoded} differs from the record's {expected}"
        self.skipped += 1
        logger.warning("skipping record %d (%s): %s [%d skipped in this process]", i, path, reason, self.skipped)
        return None

    def _views(self, image: torch.Tensor, i: int, index: int) -> tuple[Any, tuple[str, str], bool]:
        height, width = int(image.shape[1]), int(image.shape[2])
        pair_transform = self.view_pair
        # The same draws as ObjectAwareDataset._views: the boxes equal the loader path's for the same seed.
        rng = pair_transform.rng if self.seed is None else np.random.default_rng([self.seed, self.epoch, index])
        pair = pair_transform.policy.sample(width, height, self.store.boxes_of(i), rng)
        pair_transform.count(pair.fallback)
        augment_rng = rng if self.seed is None else np.random.default_rng(int(rng.integers(2**62)))
        params = self.preset.draw(augment_rng)
        return (image, pair.crops, params), pair.kinds, pair.fallback

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        image, crops, params = sample.pop("views")
        sample.update(
            image=image,
            crops=torch.from_numpy(np.asarray(crops, dtype=np.float32)),
            params=torch.from_numpy(params),
        )
        return sample


def _unused(view: Any) -> Any:
    return view


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batches device-path samples: the images padded into one ``uint8`` ``[B, 3, H, W]`` tensor (the one
    the DataLoader pins), with ``sizes`` (``[B, 2]`` heights and widths), ``crops`` ``[B, 2, 4]``, ``params``
    ``[B, 2, P]`` and the loader path's ``kinds``, ``index``, ``replaced`` and ``fallback``."""
    images = [s["image"] for s in samples]
    return {
        "images": pad_images(images),
        "sizes": torch.tensor([[int(im.shape[1]), int(im.shape[2])] for im in images], dtype=torch.int64),
        "crops": torch.stack([s["crops"] for s in samples]),
        "params": torch.stack([s["params"] for s in samples]),
        "kinds": torch.stack([s["kinds"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
        "replaced": torch.tensor([int(s["replaced"]) for s in samples]),
        "fallback": sum(int(s.get("fallback", False)) for s in samples),
    }
