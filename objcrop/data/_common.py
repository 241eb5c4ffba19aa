"""Pieces shared by the dataset readers: counted skips, box cleaning, size checks, building Records,
existence checks and header scans."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from objcrop.boxes import as_boxes, sanitize
from objcrop.data.images import ImageReadError, image_size, relative_image_paths
from objcrop.data.records import Records

logger = logging.getLogger("objcrop.data")

# The largest image side a Records table holds (its sizes are int32).
MAX_SIDE = int(np.iinfo(np.int32).max)


class SkipCounter:
    """Counts what a reader dropped or skipped and logs it once, with a few example names.

    Args:
        what: What is counted, plural ("bad boxes", "images missing on disk").
        source: The file or folder being read, named in the message.
    """

    def __init__(self, what: str, source: str | os.PathLike, examples: int = 5) -> None:
        self.what = what
        self.source = os.fspath(source)
        self.max_examples = examples
        self.total = 0
        self.items = 0
        self.examples: list[str] = []

    def add(self, name: str, count: int = 1, reason: str = "") -> None:
        if count <= 0:
            return
        self.total += count
        self.items += 1
        if len(self.examples) < self.max_examples:
            detail = f" ({reason})" if reason else ""
            self.examples.append(f"{name}: {count}{detail}" if count > 1 else f"{name}{detail}")

    def log(self) -> None:
        """Logs one warning when anything was counted."""
        if self.total:
            where = f" in {self.items} images" if self.items != self.total else ""
            more = "; ..." if self.items > len(self.examples) else ""
            examples = "; ".join(self.examples)
            logger.warning("%s: %d %s%s (%s%s)", self.source, self.total, self.what, where, examples, more)


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a sorted array starts a new run of equal values."""
    if not len(sorted_values):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))


def unique_counts(values) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique int64 values and their counts (sort-based: NumPy 2's hash-based ``np.unique``
    is much slower on large int arrays)."""
    ordered = np.sort(np.asarray(values, np.int64).reshape(-1))
    starts = _run_starts(ordered)
    return ordered[starts], np.diff(np.append(starts, len(ordered)))


def sanitize_by_size(boxes: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`objcrop.boxes.sanitize` for boxes of images of different sizes (``widths[k]`` and
    ``heights[k]`` belong to ``boxes[k]``), with one vectorized call per distinct image size.

    Returns:
        The kept, clipped boxes (input order) and the boolean mask of kept rows.
    """
    boxes = as_boxes(boxes)
    out = np.zeros_like(boxes)
    keep = np.zeros(len(boxes), bool)
    if not len(boxes):
        return boxes, keep
    sizes = np.asarray(widths, np.int64) << 32 | np.asarray(heights, np.int64)
    order = np.argsort(sizes, kind="stable")
    starts = _run_starts(sizes[order])
    for start, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(order)], strict=True):
        rows = order[start:stop]
        size = int(sizes[rows[0]])
        kept, mask = sanitize(boxes[rows], size >> 32, size & 0xFFFFFFFF)
        out[rows[mask]] = kept
        keep[rows[mask]] = True
    return out[keep], keep


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def size_problem(width: float, height: float) -> str | None:
    """Why ``width x height`` is no usable image size (not finite, below 1, beyond :data:`MAX_SIDE`), or None."""
    if not (math.isfinite(width) and math.isfinite(height)):
        return "not finite"
    if width < 1 or height < 1:
        return "not positive"
    if width > MAX_SIDE or height > MAX_SIDE:
        return f"larger than {MAX_SIDE} pixels, the most a size can hold"
    return None


def _checked_sizes(values, n: int, paths: Sequence[str], source, what: str) -> np.ndarray:
    """``values`` as int64 ``[n]``, or a ValueError naming the first image whose size is unusable."""
    try:
        sizes = np.asarray(values, np.float64).reshape(n)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{os.fspath(source)}: image {what}s are not numbers ({err})") from err
    bad = ~np.isfinite(sizes) | (sizes < 1) | (sizes > MAX_SIDE)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{os.fspath(source)}: image {paths[i]!r}: invalid {what} {sizes[i]:g}")
    return sizes.astype(np.int64)


def ids_from_stems(stems: Sequence[str]) -> list[int] | None:
    """The file stems as image ids when every stem is a decimal number that fits int64 (COCO's
    ``000000000139``), else None (the running index is used)."""
    if not stems or not all(s.isdecimal() and len(s) <= 18 for s in stems):
        return None
    return [int(s) for s in stems]


def existing_images(root: str | os.PathLike, paths: Sequence[str], source: str | os.PathLike) -> np.ndarray:
    """Which of ``root/path`` are files: missing ones are counted and logged once (with the first
    few paths), so that a long job goes on with the rest.

    Returns:
        Bool ``[n]``, True where the image file exists.

    Raises:
        ValueError: None of them exists (a wrong ``--images`` folder), naming the folder.
    """
    ok = np.array([os.path.isfile(os.path.join(root, p)) for p in paths], dtype=bool)
    missing = SkipCounter("images missing on disk (skipped)", source)
    for i in np.flatnonzero(~ok).tolist():
        missing.add(os.path.join(os.fspath(root), paths[i]))
    missing.log()
    _require_some(ok, root, paths, "exists")
    return ok


def _require_some(ok: np.ndarray, root, paths: Sequence[str], verb: str) -> None:
    if len(ok) and not ok.any():
        first = os.path.join(os.fspath(root), paths[0])
        raise ValueError(
            f"{os.fspath(root)}: none of the {len(ok)} images {verb} (the first is {first}); check --images"
        )


def build_records(
    *,
    root: str | os.PathLike,
    paths: Sequence[str],
    widths,
    heights,
    boxes,
    box_labels,
    box_image,
    labels,
    label_image,
    class_names: Sequence[str],
    image_ids=None,
    source: str | os.PathLike,
) -> Records:
    """Builds :class:`Records` from flat per-box and per-label arrays, in any order.

    Boxes are clipped to their image and unusable ones (NaN/inf, empty, outside) dropped; the drops
    are counted and logged once for ``source``. Image-level labels are made unique per image.

    Args:
        root: Folder the image paths are relative to.
        paths: Image paths, one per image.
        widths: Image widths, one per image.
        heights: Image heights, one per image.
        boxes: ``[M, 4]`` xyxy pixel boxes.
        box_labels: ``[M]`` class index of each box.
        box_image: ``[M]`` image index of each box; boxes of one image keep their order.
        labels: ``[L]`` image-level class indices.
        label_image: ``[L]`` image index of each label.
        class_names: The classes; every label must be an index into it.
        image_ids: The dataset's image ids (default: running index).
        source: Annotation file or folder named in the log.
    """
    n, num_classes = len(paths), len(class_names)
    widths = _checked_sizes(widths, n, paths, source, "width")
    heights = _checked_sizes(heights, n, paths, source, "height")
    box_image = np.asarray(box_image, np.int64).reshape(-1)
    box_labels = np.asarray(box_labels, np.int64).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    label_image = np.asarray(label_image, np.int64).reshape(-1)
    for what, values in (("box", box_labels), ("image-level", labels)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{os.fspath(source)}: {what} label outside 0..{num_classes - 1}")

    boxes, keep = sanitize_by_size(boxes, widths[box_image], heights[box_image])
    drops = SkipCounter("bad boxes dropped", source)
    dropped = np.bincount(box_image[~keep], minlength=n)
    for i in np.flatnonzero(dropped).tolist():
        drops.add(paths[i], int(dropped[i]))
    drops.log()

    box_image, box_labels = box_image[keep], box_labels[keep]
    order = np.argsort(box_image, kind="stable")
    codes, _ = unique_counts(label_image * max(num_classes, 1) + labels)  # sorted by image, then class
    return Records(
        root=os.fspath(root),
        paths=paths,
        widths=widths,
        heights=heights,
        boxes=boxes[order],
        box_labels=box_labels[order],
        box_offsets=_offsets(np.bincount(box_image, minlength=n)),
        labels=codes % max(num_classes, 1),
        label_offsets=_offsets(np.bincount(codes // max(num_classes, 1), minlength=n)),
        class_names=class_names,
        image_ids=image_ids,
    )


def list_images(root: str | os.PathLike) -> list[str]:
    """:func:`~objcrop.data.images.relative_image_paths`, with the names that are not valid UTF-8
    counted and logged once (by their bytes) instead of dropped silently."""
    undecodable: list[bytes] = []
    keys = relative_image_paths(root, undecodable)
    skipped = SkipCounter("file or folder names that are not valid UTF-8 (skipped)", root)
    for name in undecodable:
        skipped.add(repr(name))
    skipped.log()
    return keys


def read_sizes(root: str | os.PathLike, keys: Sequence[str], desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads ``(width, height)`` of ``root/key`` from the image headers, skipping unreadable images.

    Missing and undecodable images are counted and logged once each (a long read goes on).

    Returns:
        ``ok`` (bool ``[n]``, readable), ``widths`` and ``heights`` (int32 ``[n]``, 0 where not ok).

    Raises:
        ValueError: None of the images is readable (a wrong folder), naming the folder.
    """
    n = len(keys)
    ok = np.zeros(n, bool)
    widths = np.zeros(n, np.int32)
    heights = np.zeros(n, np.int32)
    missing = SkipCounter("images missing on disk (skipped)", root)
    broken = SkipCounter("unreadable images (skipped)", root)
    for i, key in enumerate(tqdm(keys, desc=desc, unit=" img", disable=None, leave=False)):
        try:
            widths[i], heights[i] = image_size(os.path.join(root, key))
            ok[i] = True
        except FileNotFoundError:
            missing.add(key)
        except ImageReadError as err:
            broken.add(key, reason=err.reason)
    missing.log()
    broken.log()
    _require_some(ok, root, keys, "is readable")
    return ok, widths, heights
