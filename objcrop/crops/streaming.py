"""The streaming SSL training dataset: webdataset tar shards -> two object-aware views per sample.

:class:`StreamingObjectAwareDataset` is a torch ``IterableDataset`` built on the ``webdataset``
library. It reads the shards sequentially (no random access, so network storage is read at full
speed), looks up each sample's proposals by its key in a proposal store, and yields the same sample
dict as :class:`~objcrop.crops.dataset.ObjectAwareDataset`.

How an epoch is cut (the "plan", set by the trainer through :meth:`~StreamingObjectAwareDataset.plan`):

* An epoch is ``steps`` batches of ``batch_size`` samples per process, like the map-style dataset's
  (``len(dataset) // processes // batch_size``).
* The shard list is shuffled by ``(seed, epoch, pass)``, then dealt to the processes
  (``shards[rank::world_size]``) and within a process to ``max(workers, 1)`` *streams*
  (``[stream::streams]``). Stream ``r`` makes batches ``r, r + streams, ...`` of the epoch, which
  the DataLoader's round-robin over its workers delivers in order. A stream that runs out of shards
  starts another pass over a new shuffle, so an epoch sees about ``len(dataset)`` samples, each
  roughly once (webdataset's usual compromise; unequal shards make some samples twice, some not).
* Inside a stream, samples pass a shuffle buffer seeded by ``(seed, epoch, rank, stream, pass)``.
* Sample ``p`` of the epoch (``p = batch * batch_size + k``) is cut from the ``p``-th sample of its
  stream, or, when that one is unusable (no image, undecodable, not in the store, another size than
  the store's), from the next usable one (counted in ``replaced``, logged naming shard and key), as
  the map-style dataset replaces a bad record by the next. Its crops and augmentations are seeded by
  ``(seed, epoch, rank, p)``.

So every batch is a function of ``(seed, epoch, rank, batch index)`` and the shards: a run resumed
after ``b`` batches of an epoch skips the first samples of each stream without decoding them and
yields exactly the batches the uninterrupted run would have yielded from batch ``b`` on. This holds
with the same number of processes and the same ``train.workers``; with another ``train.workers``
the rest of the interrupted epoch is a different (equally valid) stream.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from objcrop.crops.policies import KIND_CODES, ViewPairPolicy
from objcrop.crops.transforms import ViewPairTransform, ViewTransform
from objcrop.data.images import ImageReadError, load_image_bytes
from objcrop.data.webdataset import MEMBER_SEPARATOR, expand_shards, image_suffix, read_webdataset
from objcrop.proposals import GT, ProposalStore

__all__ = ["EpochPlan", "StreamingObjectAwareDataset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    """What one process streams in an epoch (see the module docstring).

    Attributes:
        steps: Batches of this process in the epoch.
        start: Batches already done (a resumed epoch starts there).
        batch_size: Samples per batch (the DataLoader's ``batch_size``).
        workers: The DataLoader's ``num_workers`` (0: in the main process).
        rank: This process's rank.
        world_size: Number of processes.
    """

    steps: int
    start: int = 0
    batch_size: int = 1
    workers: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.steps or self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"invalid epoch plan {self}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")

    @property
    def streams(self) -> int:
        """Independent sample streams of this rank: one per loader worker (1 without workers)."""
        return max(self.workers, 1)


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class _KeyIndex:
    """Store row of a sample key, from sorted 64-bit key hashes (numpy: workers share the pages)."""

    def __init__(self, keys: Sequence[str]) -> None:
        hashes = np.fromiter((_hash64(k) for k in keys), dtype=np.int64, count=len(keys))
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._order]
        self._keys = keys

    def find(self, key: str) -> int | None:
        h = _hash64(key)
        lo, hi = np.searchsorted(self._sorted, h, "left"), np.searchsorted(self._sorted, h, "right")
        return next((int(row) for row in self._order[lo:hi] if self._keys[int(row)] == key), None)


def _every(source: Iterator, start: int, step: int) -> Iterator:
    """A webdataset node/worker splitter: items ``start, start + step, ...`` of the shard stream."""
    return itertools.islice(source, start, None, step)


class StreamingObjectAwareDataset(IterableDataset):
    """Two object-aware views of each streamed sample of webdataset shards.

    Args:
        shards: The shard files (see :func:`~objcrop.data.webdataset.expand_shards`).
        store: Proposals keyed by sample key (``objcrop propose --format webdataset``, or
            ``ProposalStore.from_records(read_webdataset(...))`` for GT boxes).
        policy: Chooses the two crop boxes; calibrated from ``store`` here (the paper's object scale).
        transform: Augmentation of each view, or a pair (default MoCo-v2).
        size: Side of the square views in pixels.
        seed: Seed of the shard order, the shuffle buffers, the crops and the augmentations.
        shuffle_shards: Shuffle the shard list each epoch and pass.
        shuffle_buffer: Samples in each stream's shuffle buffer (0 or 1: none).
        max_tries: How many samples in a row may be unusable before iteration raises.

    Yields:
        Dicts with ``views`` (two tensors), ``kinds`` (int64 ``[2]`` view-kind codes), ``index``
        (the sample's row in ``store``), ``replaced`` (unusable samples skipped for it), ``fallback``
        and ``key`` (the sample key).
    """

    def __init__(
        self,
        shards: Sequence[str],
        store: ProposalStore,
        policy: ViewPairPolicy,
        transform: ViewTransform | Sequence[ViewTransform] | None = None,
        size: int = 224,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        max_tries: int = 10,
    ) -> None:
        if not shards:
            raise ValueError("no shards to stream")
        if max_tries < 1 or shuffle_buffer < 0:
            raise ValueError(f"need max_tries >= 1 and shuffle_buffer >= 0, got {max_tries} and {shuffle_buffer}")
        self.shards = [os.fspath(s) for s in shards]
        self.store = store
        policy.calibrate(store.size, store.boxes_of, len(store))
        self.view_pair = ViewPairTransform(policy, size=size, view_transforms=transform, seed=seed)
        self.seed = int(seed)
        self.shuffle_shards = bool(shuffle_shards)
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_tries = int(max_tries)
        self._rows = _KeyIndex(store.keys)
        self._plan: EpochPlan | None = None
        self.epoch = 0
        self.skipped = 0

    @classmethod
    def from_shards(
        cls,
        images: str | os.PathLike,
        proposals: str,
        policy: ViewPairPolicy,
        *,
        annotations=None,
        labels_csv=None,
        classes_csv=None,
        **kwargs,
    ) -> StreamingObjectAwareDataset:
        """The dataset of a shard folder or brace pattern ``images`` with ``proposals``: ``"gt"`` (the
        boxes of the samples' JSON, read once from all shards now) or a store folder (opened as it is:
        the stream checks each sample's key and size against it). ``annotations``, ``labels_csv`` and
        ``classes_csv`` exist to be refused: shards carry their own boxes."""
        given = [
            k for k, v in (("annotations", annotations), ("labels_csv", labels_csv), ("classes_csv", classes_csv)) if v
        ]
        if given:
            raise ValueError(f"format 'webdataset' takes no data.{given[0]} (boxes come from each sample's json)")
        shards = expand_shards(images)
        store = (
            ProposalStore.from_records(read_webdataset(images)) if proposals == GT else ProposalStore.open(proposals)
        )
        return cls(shards, store, policy, **kwargs)

    @property
    def policy(self) -> ViewPairPolicy:
        """The (calibrated) view-pair policy."""
        return self.view_pair.policy

    def __len__(self) -> int:
        """Samples in an epoch over all processes: the store's count."""
        return len(self.store)

    def __repr__(self) -> str:
        return f"StreamingObjectAwareDataset({len(self.shards)} shards, {len(self)} samples, {self.view_pair!r})"

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch: its shard order, shuffle buffers and sample seeds."""
        self.epoch = int(epoch)

    def plan(
        self, steps: int, start: int = 0, batch_size: int = 1, workers: int = 0, rank: int = 0, world_size: int = 1
    ) -> EpochPlan:
        """Sets what the next iteration streams (see :class:`EpochPlan`); call before making the DataLoader.

        Raises:
            ValueError: An invalid plan, or fewer shards than ``world_size * max(workers, 1)`` streams.
        """
        plan = EpochPlan(int(steps), int(start), int(batch_size), int(workers), int(rank), int(world_size))
        if len(self.shards) < plan.world_size * plan.streams:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {plan.world_size} processes x {plan.streams} loader streams "
                "(each stream reads whole shards); lower train.workers or write more, smaller shards"
            )
        self._plan = plan
        return plan

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        plan = self._plan or EpochPlan(steps=len(self), workers=0 if info is None else info.num_workers)
        running = 1 if info is None else info.num_workers
        if running != plan.streams:
            raise RuntimeError(f"the epoch was planned for {plan.workers} loader workers but runs in {running}")
        stream = ((0 if info is None else info.id) + plan.start) % plan.streams
        first = max(0, -(-(plan.start - stream) // plan.streams))  # this stream's first batch not done yet
        raw = self._raw_samples(stream, plan)
        collections.deque(itertools.islice(raw, first * plan.batch_size), maxlen=0)  # read, not decoded
        window: collections.deque = collections.deque()
        for batch in itertools.count(first * plan.streams + stream, plan.streams):
            if batch >= plan.steps:
                return
            for k in range(plan.batch_size):
                yield self._sample(window, raw, batch * plan.batch_size + k, plan.rank)

    def _raw_samples(self, stream: int, plan: EpochPlan) -> Iterator[dict[str, Any]]:
        """The endless sample stream of one (rank, stream): pass after pass over its shards."""
        import webdataset as wds

        for pass_ in itertools.count():
            urls = list(self.shards)
            if self.shuffle_shards:
                urls = [urls[i] for i in np.random.default_rng([self.seed, self.epoch, pass_]).permutation(len(urls))]
            pipeline = wds.WebDataset(
                urls,
                nodesplitter=functools.partial(_every, start=plan.rank, step=plan.world_size),
                workersplitter=functools.partial(_every, start=stream, step=plan.streams),
                shardshuffle=False,
                empty_check=False,
                handler=wds.warn_and_continue,  # a damaged shard is warned about, the epoch goes on
                seed=0,  # webdataset would otherwise draw one from the global `random` module
            )
            if self.shuffle_buffer > 1:
                (seed,) = np.random.SeedSequence([self.seed, self.epoch, plan.rank, stream, pass_]).generate_state(1)
                pipeline = pipeline.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=int(seed))
            count = 0
            for sample in pipeline:
                count += 1
                yield sample
            if count == 0:
                mine = urls[plan.rank :: plan.world_size][stream :: plan.streams]
                raise ValueError(f"the shards {', '.join(mine)} hold no samples")

    def _sample(self, window: collections.deque, raw: Iterator, position: int, rank: int) -> dict[str, Any]:
        """Sample ``position`` of the epoch, from the first usable of the next ``max_tries`` raw samples."""
        while len(window) < self.max_tries:
            window.append([next(raw), None])  # [raw sample, its decoded form or False once prepared]
        for replaced in range(len(window)):
            entry = window[replaced]
            if entry[1] is None:
                entry[1] = self._prepare(entry[0])
            if entry[1] is not False:
                break
        else:
            first = window[0][0]
            raise RuntimeError(
                f"no usable sample in {self.max_tries} in a row, from {first.get('__key__')} of "
                f"{first.get('__url__')}; see the warnings above"
            )
        window.popleft()
        image, row, key = entry[1]
        rng = np.random.default_rng([self.seed, self.epoch, rank, position])
        pair = self.view_pair.policy.sample(*image.size, self.store.boxes_of(row), rng)
        self.view_pair.count(pair.fallback)
        # The torchvision augmentations draw from torch's global generator: seed it for this sample only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            views = self.view_pair.cut_views(image, pair.crops)
        kinds = torch.tensor([KIND_CODES[k] for k in pair.kinds], dtype=torch.int64)
        return {
            "views": views,
            "kinds": kinds,
            "index": row,
            "replaced": replaced,
            "fallback": pair.fallback,
            "key": key,
        }

    def _prepare(self, sample: dict[str, Any]):
        """``(image, store row, key)`` of a raw sample, or False (logged and counted) when it is unusable."""
        key, shard = sample.get("__key__"), sample.get("__url__")
        suffix = image_suffix(s for s in sample if not s.startswith("__"))
        row = None if suffix is None else self._rows.find(key)
        if suffix is None:
            reason = "no image member"
        elif row is None:
            reason = "not in the proposal store (skipped when the shards were read, or a store of other shards)"
        else:
            try:
                image = load_image_bytes(sample[suffix], f"{shard}{MEMBER_SEPARATOR}{key}.{suffix}")
            except ImageReadError as err:
                reason = err.reason
            else:
                if image.size == self.store.size(row):
                    return image, row, key
                reason = f"decoded size {image.size} differs from the store's {self.store.size(row)}"
        self.skipped += 1
        logger.warning("skipping sample %s of %s: %s [%d skipped in this process]", key, shard, reason, self.skipped)
        return False
