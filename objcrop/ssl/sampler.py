"""The sampler of the pretraining and detection loops: a seeded shuffle per epoch that can start part-way."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[int]):
    """Shuffles ``n`` indices with a generator seeded by ``(seed, epoch)``, deals them to the ranks,
    and can start part-way through an epoch (to resume after ``start`` samples of this rank).

    Every rank gets ``n // world_size`` indices (the remainder is dropped, like DistributedSampler
    with ``drop_last``), so all ranks run the same number of steps.

    Args:
        n: Number of samples in the dataset.
        rank: This process's rank.
        world_size: Number of processes.
        seed: Seed of the shuffle (with the epoch).
        shuffle: ``False`` keeps the dataset's order.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's order and skips its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def indices(self) -> np.ndarray:
        """This rank's indices of the whole epoch (``start`` not applied)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        per_rank = self.n // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :].tolist())

    def __len__(self) -> int:
        return max(self.n // self.world_size - self.start, 0)
