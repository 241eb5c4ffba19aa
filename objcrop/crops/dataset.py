"""The SSL training dataset: records + proposals + a policy -> two augmented views per image."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from objcrop.crops.policies import KIND_CODES, ViewPairPolicy
from objcrop.crops.transforms import ViewPairTransform, ViewTransform
from objcrop.data.images import ImageReadError, load_image
from objcrop.data.records import Records

__all__ = ["BoxSource", "NoUsableImageError", "ObjectAwareDataset"]

logger = logging.getLogger(__name__)


class NoUsableImageError(RuntimeError):
    """Not one record of the dataset can be decoded (or matches its recorded size)."""


class BoxSource(Protocol):
    """Anything that gives the proposals of image ``i`` (``[N, 4]`` xyxy pixels, best first)."""

    def boxes_of(self, i: int) -> np.ndarray:
        """The proposals of image ``i``."""
        ...


class ObjectAwareDataset(Dataset):
    """Two object-aware views of each image, for self-supervised training.

    Per-sample metadata stays in the numpy arrays of ``records`` and ``store``, so DataLoader
    workers share those pages with the parent instead of copying them.

    An image that cannot be decoded, or whose decoded size differs from its record (its boxes
    would be misplaced), is logged, counted in :attr:`skipped`, remembered in :attr:`known_bad` (so
    it is not read again) and replaced by the next usable record, wrapping around: a run of bad
    files never ends a long job while a usable record remains. A run of ``max_tries`` or more bad
    records in a row is logged once more as such; only a dataset without any usable record raises
    :class:`NoUsableImageError`. The records a sample skipped are the ``replaced`` ones just before
    its ``index`` (modulo the length), so a trainer can count the distinct bad records it met.

    Args:
        records: The images (paths and sizes).
        store: Proposals of each record, e.g. a :class:`~objcrop.proposals.ProposalStore`.
        policy: Chooses the two crop boxes.
        transform: Augmentation of each view, or a pair for asymmetric methods (default MoCo-v2).
        size: Side of the square views in pixels.
        seed: With a seed, every sample's crops and augmentations are a function of
            ``(seed, epoch, index)`` alone: the same whatever the number of workers or the order, so a
            resumed run repeats the uninterrupted one exactly (call :meth:`set_epoch` each epoch).
            Without one, each DataLoader worker draws from its own stream seeded by the DataLoader.
        max_tries: Length of a run of bad records in a row that is reported as a run (the scan goes on).

    Returns (from ``__getitem__``):
        A dict with ``views`` (list of two tensors), ``kinds`` (int64 ``[2]`` codes from
        :data:`~objcrop.crops.policies.KIND_CODES`), ``index`` (the record the views were cut
        from: the requested index unless records were replaced) and ``replaced`` (how many
        unusable records were skipped to produce the sample).
    """

    def __init__(
        self,
        records: Records,
        store: BoxSource,
        policy: ViewPairPolicy,
        transform: ViewTransform | Sequence[ViewTransform] | None = None,
        size: int = 224,
        seed: int | None = None,
        max_tries: int = 10,
    ) -> None:
        if not hasattr(store, "boxes_of"):
            raise TypeError(f"store must have a boxes_of(i) method, got {type(store).__name__}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.records = records
        self.store = store
        # The paper's object-crop scale is a property of the dataset's proposals: resolve it once here,
        # before workers copy the policy.
        policy.calibrate(records.size, store.boxes_of, len(records))
        self.view_pair = ViewPairTransform(policy, size=size, view_transforms=transform, seed=seed)
        self.max_tries = int(max_tries)
        self.seed = seed
        self.epoch = 0
        self.skipped = 0
        self.known_bad: set[int] = set()  # records that failed to load: skipped without reading again

    @property
    def policy(self) -> ViewPairPolicy:
        """The (calibrated) view-pair policy."""
        return self.view_pair.policy

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose randomness seeded samples use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"ObjectAwareDataset({len(self)} images, {self.view_pair!r})"

    def _load(self, i: int) -> Any | None:
        path = self.records.path(i)
        try:
            image = load_image(path)
        except (ImageReadError, OSError) as err:
            reason = str(err)
        else:
            expected = self.records.size(i)
            if image.size == expected:
                return image
            reason = f"decoded size {image.size} differs from the record's {expected}"
        self.skipped += 1
        logger.warning("skipping record %d (%s): %s [%d skipped in this process]", i, path, reason, self.skipped)
        return None

    def _views(self, image, i: int, index: int) -> tuple[list[Any], tuple[str, str], bool]:
        pair_transform = self.view_pair
        width, height = image.size
        if self.seed is None:
            pair = pair_transform.policy.sample(width, height, self.store.boxes_of(i), pair_transform.rng)
            pair_transform.count(pair.fallback)
            return pair_transform.cut_views(image, pair.crops), pair.kinds, pair.fallback
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pair = pair_transform.policy.sample(width, height, self.store.boxes_of(i), rng)
        pair_transform.count(pair.fallback)
        # The torchvision augmentations draw from torch's global generator: seed it for this sample
        # only, leaving the caller's stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            views = pair_transform.cut_views(image, pair.crops)
        return views, pair.kinds, pair.fallback

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        index %= n
        failed_here = 0
        for replaced in range(n):  # forward, wrapping around, to the first usable record
            i = (index + replaced) % n
            if replaced == self.max_tries and failed_here:
                logger.warning(
                    "%d or more unusable records in a row from record %d (%s); scanning on to the next usable one",
                    replaced, index, self.records.path(index),
                )  # fmt: skip
            if i in self.known_bad:
                continue
            image = self._load(i)
            if image is None:
                self.known_bad.add(i)
                failed_here += 1
                continue
            views, kinds, fallback = self._views(image, i, index)
            codes = torch.tensor([KIND_CODES[k] for k in kinds], dtype=torch.int64)
            return {"views": views, "kinds": codes, "index": i, "replaced": replaced, "fallback": fallback}
        raise NoUsableImageError(
            f"none of the {n} records can be used (the first: {self.records.path(0)}); see the warnings above"
        )
