"""A PyTorch Lightning ``LightningDataModule`` for :class:`~objcrop.crops.dataset.ObjectAwareDataset`.

``import objcrop`` never imports Lightning; importing this module does (``pip install objcrop[interop]``).

Epoch seeding needs no callback: the loader's sampler is an :class:`EpochSeedingSampler`, a
``DistributedSampler`` whose ``set_epoch`` also calls the dataset's ``set_epoch``. Lightning calls
``sampler.set_epoch(trainer.current_epoch)`` before every training epoch (also after a resume), and leaves
a ``DistributedSampler`` in place under DDP, so each rank shuffles, shards and seeds its crops by epoch.
Workers are not persistent, so every epoch's workers receive the dataset with its new epoch.

Usage::

    from objcrop.crops.lightning import ObjectAwareDataModule
    from objcrop.ssl.config import load_config
    from objcrop.ssl.trainer import build_dataset

    data = ObjectAwareDataModule(build_dataset(load_config("configs/x.yaml")), batch_size=256, workers=8)
    lightning.Trainer(max_epochs=200).fit(my_module, datamodule=data)
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, default_collate

__all__ = ["BATCH_FORMATS", "EpochSeedingSampler", "ObjectAwareDataModule", "collate_views"]

# "objcrop": {"views": [x1, x2], "kinds": [B, 2], "index", "replaced", "fallback"}, what objcrop's methods take;
# "solo": [indexes, [x1, x2], targets], solo-learn's batch (targets -1: no labels, its ignore_index).
BATCH_FORMATS = ("objcrop", "solo")


class EpochSeedingSampler(DistributedSampler):
    """A ``DistributedSampler`` whose :meth:`set_epoch` also sets the dataset's epoch (crops and augmentations).

    Outside ``torch.distributed`` it is one replica of rank 0: a (seeded) shuffle of the whole dataset.

    Args:
        dataset: A map-style dataset with ``set_epoch(epoch)``.
        shuffle: Shuffle the order each epoch (seeded by ``seed`` and the epoch).
        seed: Seed of the order, the same on every rank.
        drop_last: Drop the tail that does not divide among the ranks (else pad by repeating).
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> None:
        if not callable(getattr(dataset, "set_epoch", None)):
            raise TypeError(f"{type(dataset).__name__} has no set_epoch(epoch): epochs could not reseed its crops")
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the sampler and of the dataset (which seeds its views with it)."""
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)


def collate_views(samples: list[dict[str, Any]], batch_format: str = "objcrop") -> Any:
    """Batches :class:`~objcrop.crops.dataset.ObjectAwareDataset` samples in one of :data:`BATCH_FORMATS`."""
    batch = default_collate(samples)
    if batch_format == "solo":
        return [batch["index"], batch["views"], torch.full_like(batch["index"], -1)]
    return batch


class ObjectAwareDataModule(pl.LightningDataModule):
    """Serves an object-aware dataset to ``lightning.Trainer``: the train dataloader, reseeded every epoch.

    Args:
        dataset: A map-style dataset with ``set_epoch``, e.g. :class:`~objcrop.crops.dataset.ObjectAwareDataset`
            (``objcrop.ssl.trainer.build_dataset(config)`` builds the one a pretraining config describes).
        batch_size: Samples per batch and rank.
        workers: DataLoader processes (started with forkserver; not persistent, so each epoch's workers see
            the dataset's new epoch).
        shuffle: Shuffle the order every epoch.
        seed: Seed of the order (the crops follow the dataset's own seed).
        drop_last: Drop the last incomplete batch (BatchNorm wants full ones).
        pin_memory: Pin batches for faster host-to-GPU copies.
        batch_format: One of :data:`BATCH_FORMATS`.

    Raises:
        ValueError: Bad ``batch_size``, ``workers`` or ``batch_format``.
        TypeError: A dataset without ``set_epoch``, or an iterable (streamed) dataset.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        pin_memory: bool = False,
        batch_format: str = "objcrop",
    ) -> None:
        super().__init__()
        if isinstance(dataset, IterableDataset):
            raise TypeError("ObjectAwareDataModule serves map-style datasets; a streamed dataset plans its own epochs")
        if not callable(getattr(dataset, "set_epoch", None)):
            raise TypeError(f"{type(dataset).__name__} has no set_epoch(epoch): epochs could not reseed its crops")
        if int(batch_size) < 1 or int(workers) < 0:
            raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
        if batch_format not in BATCH_FORMATS:
            raise ValueError(f"batch_format must be one of {', '.join(BATCH_FORMATS)}, got {batch_format!r}")
        self.dataset = dataset
        self.batch_size, self.workers = int(batch_size), int(workers)
        self.shuffle, self.seed, self.drop_last, self.pin_memory = shuffle, int(seed), drop_last, pin_memory
        self.batch_format = batch_format

    def train_dataloader(self) -> DataLoader:
        """The training loader: epoch-seeded sampler, forkserver workers, views collated in the batch format."""
        sampler = EpochSeedingSampler(self.dataset, shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.workers,
            collate_fn=functools.partial(collate_views, batch_format=self.batch_format),
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            persistent_workers=False,
            multiprocessing_context="forkserver" if self.workers else None,
        )
