"""Frozen-backbone features: the read-out transform, batched extraction, and a float16 cache on disk.

A cache entry is ``<name>.npy`` (float16 ``[N, D]``) plus ``<name>.json``, the key it was computed
for: the backbone's identity (weights file path, mtime and size, or the random seed), the read-out
size and mode, and the dataset (root, image count, hash of the image paths). An entry whose key
differs from the one asked for is stale and is recomputed. Images that cannot be read are counted,
logged, and stored as NaN rows; :func:`valid_rows` finds the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from objcrop.crops.augment import IMAGENET_MEAN, IMAGENET_STD
from objcrop.data.images import ImageReadError, load_image
from objcrop.data.records import Records
from objcrop.evaluate.backbone import RANDOM_PREFIX, BackboneInfo, backbone_info, load_backbone
from objcrop.io import atomic_open, write_json_atomic

__all__ = [
    "READOUT_MODES",
    "FeatureCache",
    "RecordImages",
    "augment_transform",
    "cache_entry_name",
    "cached_features",
    "cached_split_features",
    "dataset_key",
    "default_cache_dir",
    "extract_features",
    "readout_transform",
    "valid_rows",
]

logger = logging.getLogger(__name__)

READOUT_MODES = ("center", "squash")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def readout_transform(size: int, mode: str = "center") -> v2.Compose:
    """The deterministic evaluation transform: PIL image -> normalised float tensor ``[3, size, size]``.

    Args:
        size: Side of the read-out image in pixels.
        mode: ``"center"`` resizes the shorter side to ``size`` and takes the central square;
            ``"squash"`` resizes the whole image to ``size x size`` (keeps objects near the borders).
    """
    if mode not in READOUT_MODES:
        raise ValueError(f"unknown read-out mode {mode!r}; choose one of {', '.join(READOUT_MODES)}")
    geometry = (
        [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        if mode == "center"
        else [v2.Resize((size, size), antialias=True)]
    )
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def augment_transform(size: int, scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """The training transform of the paper's linear protocol and the supervised baseline:
    RandomResizedCrop to ``size`` (area share in ``scale``) + horizontal flip, then normalisation."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class RecordImages(Dataset):
    """The images of a :class:`Records` table through a transform; unreadable ones come back flagged.

    Items are ``(image tensor, index, ok)``; for an unreadable image ``ok`` is False and the tensor is zeros.
    """

    def __init__(self, records: Records, transform: Callable, size: int) -> None:
        self.records = records
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        path = self.records.path(i)
        try:
            return self.transform(load_image(path)), i, True
        except (ImageReadError, FileNotFoundError) as err:
            logger.warning("skipping image %d: %s", i, err)
            return torch.zeros(3, self.size, self.size), i, False


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    records: Records,
    size: int,
    batch_size: int = 64,
    workers: int = 0,
    mode: str = "center",
    progress: bool = True,
) -> np.ndarray:
    """Runs the frozen ``backbone`` over every image of ``records`` at the read-out resolution.

    The backbone is put in eval mode for the pass and restored afterwards; it runs on the device of
    its parameters. A 4-D output (a feature map) is average-pooled.

    Args:
        backbone: Network mapping ``[B, 3, size, size]`` to ``[B, D]`` (or ``[B, D, h, w]``).
        records: The images.
        size: Read-out side in pixels.
        batch_size: Images per forward pass.
        workers: DataLoader worker processes.
        mode: Read-out geometry (see :func:`readout_transform`).
        progress: Show a progress bar.

    Returns:
        Float16 ``[N, D]`` features in the order of ``records``; rows of unreadable images are NaN.

    Raises:
        ValueError: No image could be read.
    """
    dataset = RecordImages(records, readout_transform(size, mode), size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    device = _device_of(backbone)
    was_training = backbone.training
    backbone.eval()
    chunks: list[np.ndarray] = []
    skipped = 0
    start = time.perf_counter()
    try:
        for images, _, ok in tqdm(loader, desc="features", unit="batch", disable=not progress, dynamic_ncols=True):
            out = backbone(images.to(device, non_blocking=True))
            if out.ndim == 4:
                out = out.mean(dim=(2, 3))
            feats = out.float().cpu().numpy().clip(-_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
            feats[~ok.numpy()] = np.nan
            skipped += int((~ok).sum())
            chunks.append(feats)
    finally:
        backbone.train(was_training)
    elapsed = time.perf_counter() - start
    if len(records) and skipped == len(records):
        raise ValueError(f"none of the {len(records)} images under {records.root} could be read")
    if skipped:
        logger.warning("%d of %d images could not be read; their features are NaN", skipped, len(records))
    logger.info(
        "extracted %d features at %d px in %.1f s (%.1f img/s)",
        len(records),
        size,
        elapsed,
        len(records) / max(elapsed, 1e-9),
    )
    if not chunks:
        return np.zeros((0, 0), np.float16)
    return np.concatenate(chunks)


def valid_rows(features: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows without NaN (the images that could be read)."""
    return ~np.isnan(features).any(axis=1)


def dataset_key(records: Records) -> dict:
    """Identity of a dataset for the cache: its root, size and a hash of its image paths and sizes in order.

    Image contents are not read: images rewritten under the same names and sizes need a new cache folder.
    """
    digest = hashlib.sha1("\n".join(records.keys()).encode("utf-8"))
    digest.update(np.ascontiguousarray(records.widths, dtype="<i4").tobytes())
    digest.update(np.ascontiguousarray(records.heights, dtype="<i4").tobytes())
    return {"root": os.path.abspath(records.root), "images": len(records), "images_sha1": digest.hexdigest()}


class FeatureCache:
    """Float16 feature arrays in ``folder``, each with a JSON sidecar holding the key it was computed for."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.npy", self.folder / f"{name}.json"

    def load(self, name: str, key: dict) -> np.ndarray | None:
        """The cached array when its sidecar matches ``key`` exactly; ``None`` on a miss or a stale entry."""
        array_path, meta_path = self.paths(name)
        if not (array_path.is_file() and meta_path.is_file()):
            return None
        try:
            stored = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("feature cache %s: unreadable sidecar, recomputing", meta_path)
            return None
        if stored.get("key") != _jsonable(key):
            logger.info("feature cache %s is stale (computed for another key), recomputing", array_path)
            return None
        try:
            array = np.load(array_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            logger.warning("feature cache %s: unreadable (%s), recomputing", array_path, err)
            return None
        if array.dtype != np.float16 or list(array.shape) != stored.get("shape"):
            logger.warning("feature cache %s: shape or dtype disagrees with its sidecar, recomputing", array_path)
            return None
        return array

    def save(self, name: str, key: dict, array: np.ndarray) -> Path:
        """Writes ``array`` as float16 and then its sidecar, each atomically (a sidecar means a whole array)."""
        array = np.ascontiguousarray(array, dtype=np.float16)
        array_path, meta_path = self.paths(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        with atomic_open(array_path, "wb") as f:
            np.save(f, array, allow_pickle=False)
        meta = {"key": _jsonable(key), "shape": list(array.shape), "dtype": "float16"}
        write_json_atomic(meta_path, meta, indent=2)
        return array_path


def _jsonable(value: dict) -> dict:
    return json.loads(json.dumps(value))


def default_cache_dir(spec: str | os.PathLike) -> Path:
    """Where features of ``spec`` are cached unless told otherwise: ``<weights file>.features/`` next to the
    file, or ``$XDG_CACHE_HOME/objcrop/features/<arch>-random/`` (``~/.cache/...``) for ``random:<arch>``."""
    spec = os.fspath(spec)
    if spec.startswith(RANDOM_PREFIX):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "objcrop" / "features" / f"{spec[len(RANDOM_PREFIX) :]}-random"
    return Path(f"{spec}.features")


def cache_entry_name(info: BackboneInfo, split: str, size: int, mode: str = "center") -> str:
    """``<split>-<size>px-<mode>-<tag>``; the tag hashes which weights these are (file path, or random
    architecture and seed) but not their mtime, so one folder holds several backbones and a rewritten
    weights file finds its old entry and sees that it is stale."""
    who = {k: v for k, v in info.fingerprint().items() if k not in ("mtime_ns", "size")}
    tag = hashlib.sha1(json.dumps(who, sort_keys=True).encode("utf-8")).hexdigest()[:10]
    return f"{split}-{size}px-{mode}-{tag}"


def cached_features(
    spec: str | os.PathLike,
    records: Records,
    split: str,
    size: int,
    cache_dir: str | os.PathLike | None = None,
    arch: str | None = None,
    small_images: bool | None = None,
    seed: int = 0,
    mode: str = "center",
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, bool]:
    """Features of ``records`` through the backbone ``spec``, from the cache or computed and cached.

    The backbone is only built on a miss. The cache entry is ``<cache_dir>/<name>.npy`` with
    ``name`` from :func:`cache_entry_name`.

    Args:
        spec: Backbone spec (see :func:`objcrop.evaluate.backbone.load_backbone`).
        records: The images.
        split: Name of the split (``"train"``, ``"test"``), part of the entry name.
        size: Read-out side in pixels.
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.
        arch: Architecture of a plain state dict.
        small_images: Small-image stem of a plain state dict or random init.
        seed: Seed of ``random:`` weights.
        mode: Read-out geometry.
        batch_size: Images per forward pass.
        workers: DataLoader worker processes.
        device: Where the backbone runs.
        progress: Show a progress bar.

    Returns:
        Float16 ``[N, D]`` features, and whether they came from the cache.
    """
    info = backbone_info(spec, arch, small_images, seed)
    key = {"backbone": info.fingerprint(), "size": int(size), "mode": mode, "dataset": dataset_key(records)}
    cache = FeatureCache(cache_dir if cache_dir is not None else default_cache_dir(spec))
    name = cache_entry_name(info, split, size, mode)
    cached = cache.load(name, key)
    if cached is not None:
        logger.info("features of %s: cache hit %s", split, cache.paths(name)[0])
        return cached, True
    backbone, _ = load_backbone(spec, arch, small_images, seed)
    feats = extract_features(backbone.to(device), records, size, batch_size, workers, mode, progress)
    cache.save(name, key, feats)
    return feats, False


def cached_split_features(
    spec: str | os.PathLike, train_records: Records, test_records: Records, size: int, **options
) -> tuple[np.ndarray, np.ndarray, int]:
    """The train and test features of one backbone, as the probes read them (one cache, one backbone).

    Args:
        spec: Backbone spec.
        train_records: The train split.
        test_records: The test split.
        size: Read-out side in pixels.
        **options: The keyword arguments of :func:`cached_features`.

    Returns:
        Train features, test features, and how many of the two came from the cache.
    """
    train_x, hit_train = cached_features(spec, train_records, "train", size, **options)
    test_x, hit_test = cached_features(spec, test_records, "test", size, **options)
    return train_x, test_x, int(hit_train) + int(hit_test)
