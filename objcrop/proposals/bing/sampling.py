"""Bounded, seeded subsampling of BING's training samples, so that training cost and memory stay flat on
large datasets (COCO, OpenImages) while small datasets keep every sample.

Each image gives at most a budget of negatives (:func:`per_image_budget`), which bounds what the workers
send back, and a :class:`Reservoir` keeps a uniform sample of at most the cap per group (all stage-I positives,
all negatives, the stage-II windows of each filter and size, the rescorer's windows) while the results stream
in, so memory stays bounded too. Every sample carries a key drawn from a generator seeded by the training
seed and its image index, so the result does not depend on the number of worker processes.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Reservoir", "per_image_budget"]


def per_image_budget(per_image: int, limit: int | None, num_images: int) -> int:
    """How many samples each of ``num_images`` images may give so that all together stay near ``limit``
    (``None``: no limit): ``min(per_image, ceil(limit / num_images))``."""
    if limit is None or num_images == 0:
        return per_image
    return min(per_image, math.ceil(limit / num_images))


class Reservoir:
    """At most ``limit`` items of each group of a stream: a uniform sample without replacement per group.

    Every item comes with a uniform random key and each group keeps the items of its ``limit`` smallest keys
    (a bottom-k sample), so the sample depends on the keys alone, not on how the stream is chunked; kept
    items stay in arrival order. Memory stays near ``limit`` items per group plus ``buffer``.

    Args:
        limit: Items kept per group (``None``: all).
        buffer: Items held before the next compaction.
    """

    def __init__(self, limit: int | None, buffer: int = 1 << 20) -> None:
        self.limit = limit
        self.buffer = buffer
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
        self._held = 0
        self._kept = 0
        self._seen = 0

    def add(self, group: np.ndarray, key: np.ndarray, **arrays: np.ndarray) -> None:
        """Adds items: ``group`` (int), ``key`` (uniform in [0, 1)) and equally long ``arrays`` per item."""
        n = len(key)
        seq = np.arange(self._seen, self._seen + n)
        self._parts.append((np.asarray(group, np.int64), np.asarray(key), seq, arrays))
        self._seen += n
        self._held += n
        if self.limit is not None and self._held > max(self.buffer, 2 * self._kept):
            self._compact()

    def _compact(self) -> None:
        group = np.concatenate([p[0] for p in self._parts])
        key = np.concatenate([p[1] for p in self._parts])
        seq = np.concatenate([p[2] for p in self._parts])
        arrays = {name: np.concatenate([p[3][name] for p in self._parts]) for name in self._parts[0][3]}
        if self.limit is not None:
            order = np.lexsort((seq, key, group))  # by group, then key (ties: arrival)
            sorted_group = group[order]
            rank = np.arange(len(order)) - np.searchsorted(sorted_group, sorted_group, side="left")
            keep = np.sort(order[rank < self.limit])
            group, key, seq = group[keep], key[keep], seq[keep]
            arrays = {name: a[keep] for name, a in arrays.items()}
        self._parts = [(group, key, seq, arrays)]
        self._held = self._kept = len(group)

    def result(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The kept items: their groups and arrays, in arrival order (at least one :meth:`add` needed)."""
        if not self._parts:
            raise ValueError("the reservoir received no items")
        self._compact()
        group, _, _, arrays = self._parts[0]
        return group, arrays
