"""The one record type that every reader produces.

A dataset is a :class:`Records` table: per-image columns (path, width, height, id) plus boxes,
box labels and image-level labels stored flat with per-image offsets. Everything is a numpy
array, so DataLoader workers share the pages after fork instead of copying (touching a Python
object writes its refcount and un-shares its page; touching a numpy array does not).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Record", "Records"]


@dataclass
class Record:
    """One image with its annotations, the convenient form for readers and users.

    Attributes:
        path: Image path relative to the dataset root (or absolute).
        width: Width in pixels of the image as decoded (EXIF orientation applied).
        height: Height in pixels, same convention.
        boxes: Float32 ``[N, 4]`` xyxy pixel boxes.
        box_labels: Int32 ``[N]`` class indices into ``Records.class_names``.
        labels: Int32 image-level class indices (sorted, unique).
        image_id: The dataset's own id of the image (COCO id), or the running index.
    """

    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    image_id: int = -1


def _offsets(counts: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _encode_paths(paths: Sequence[str]) -> list[bytes]:
    try:
        return [p.encode("utf-8") for p in paths]
    except UnicodeEncodeError:
        # A file name that is not valid UTF-8 (read with surrogate escapes); readers skip such names.
        bad = next(p for p in paths if not _is_utf8(p))
        raise ValueError(f"image path {os.fsencode(bad)!r} is not valid UTF-8") from None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int32_column(values, paths: Sequence[str], what: str) -> np.ndarray:
    """``values`` as int32 ``[len(paths)]``; a value that int32 cannot hold is an error naming the
    image, not a silent wrap-around."""
    info = np.iinfo(np.int32)
    try:
        wide = np.asarray(values, dtype=np.float64).reshape(len(paths))
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"image {what}s are not {len(paths)} numbers: {err}") from err
    bad = ~np.isfinite(wide) | (wide < info.min) | (wide > info.max)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"image {paths[i]!r}: {what} {wide[i]:g} does not fit int32")
    return wide.astype(np.int32)


class Records:
    """A dataset's images and annotations as flat numpy arrays.

    Args:
        root: Folder that relative image paths are resolved against.
        paths: Image paths, relative to ``root`` (or absolute).
        widths: Image widths in pixels.
        heights: Image heights in pixels.
        boxes: All boxes, float32 ``[M, 4]`` xyxy pixels, image after image.
        box_labels: Int32 ``[M]`` class index per box.
        box_offsets: Int64 ``[n + 1]``; image ``i`` owns ``boxes[box_offsets[i]:box_offsets[i + 1]]``.
        labels: Int32 image-level class indices, image after image.
        label_offsets: Int64 ``[n + 1]`` offsets into ``labels``.
        class_names: Name of each class index.
        image_ids: Int64 ``[n]`` dataset ids; defaults to ``arange(n)``.
    """

    def __init__(
        self,
        root: str,
        paths: Sequence[str],
        widths,
        heights,
        boxes,
        box_labels,
        box_offsets,
        labels,
        label_offsets,
        class_names: Sequence[str],
        image_ids=None,
    ) -> None:
        self.root = str(root)
        encoded = _encode_paths(paths)
        self._path_blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self._path_offsets = _offsets([len(e) for e in encoded])
        n = len(encoded)
        self.widths = _int32_column(widths, paths, "width")
        self.heights = _int32_column(heights, paths, "height")
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.box_labels = np.asarray(box_labels, dtype=np.int32).reshape(-1)
        self.box_offsets = np.asarray(box_offsets, dtype=np.int64).reshape(n + 1)
        self.labels = np.asarray(labels, dtype=np.int32).reshape(-1)
        self.label_offsets = np.asarray(label_offsets, dtype=np.int64).reshape(n + 1)
        self.class_names = tuple(str(c) for c in class_names)
        self.image_ids = (
            np.arange(n, dtype=np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64).reshape(n)
        )
        if len(self.boxes) != len(self.box_labels) or self.box_offsets[-1] != len(self.boxes):
            raise ValueError("boxes, box_labels and box_offsets disagree")
        if self.label_offsets[-1] != len(self.labels):
            raise ValueError("labels and label_offsets disagree")

    @classmethod
    def from_records(cls, records: Iterable[Record], class_names: Sequence[str], root: str = "") -> Records:
        """Builds the table from :class:`Record` objects (what readers collect)."""
        recs = list(records)
        return cls(
            root=root,
            paths=[r.path for r in recs],
            widths=[r.width for r in recs],
            heights=[r.height for r in recs],
            boxes=np.concatenate([np.asarray(r.boxes, np.float32).reshape(-1, 4) for r in recs])
            if recs
            else np.zeros((0, 4), np.float32),
            box_labels=np.concatenate([np.asarray(r.box_labels, np.int32).reshape(-1) for r in recs])
            if recs
            else np.zeros(0, np.int32),
            box_offsets=_offsets([len(np.asarray(r.boxes).reshape(-1, 4)) for r in recs]),
            labels=np.concatenate([np.asarray(r.labels, np.int32).reshape(-1) for r in recs])
            if recs
            else np.zeros(0, np.int32),
            label_offsets=_offsets([len(np.asarray(r.labels).reshape(-1)) for r in recs]),
            class_names=class_names,
            image_ids=[r.image_id if r.image_id >= 0 else i for i, r in enumerate(recs)],
        )

    def __len__(self) -> int:
        return len(self.widths)

    def __getitem__(self, i: int) -> Record:
        return Record(
            path=self.key(i),
            width=int(self.widths[i]),
            height=int(self.heights[i]),
            boxes=self.boxes_of(i),
            box_labels=self.box_labels_of(i),
            labels=self.labels_of(i),
            image_id=int(self.image_ids[i]),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return (
            f"Records({len(self)} images, {len(self.boxes)} boxes, {len(self.class_names)} classes, root={self.root!r})"
        )

    @property
    def num_classes(self) -> int:
        """How many classes the dataset names."""
        return len(self.class_names)

    def key(self, i: int) -> str:
        """The image path as stored (relative to ``root``); it identifies the image in a proposal store."""
        a, b = self._path_offsets[i], self._path_offsets[i + 1]
        return self._path_blob[a:b].tobytes().decode("utf-8")

    def keys(self) -> list[str]:
        """Every image key, in record order."""
        return [self.key(i) for i in range(len(self))]

    def path(self, i: int) -> str:
        """Full path of image ``i``."""
        return os.path.join(self.root, self.key(i))

    def size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of image ``i``."""
        return int(self.widths[i]), int(self.heights[i])

    def boxes_of(self, i: int) -> np.ndarray:
        """Float32 ``[n, 4]`` xyxy boxes of image ``i`` (a view, not a copy)."""
        return self.boxes[self.box_offsets[i] : self.box_offsets[i + 1]]

    def box_labels_of(self, i: int) -> np.ndarray:
        """Int32 ``[n]`` class index of each box of image ``i``."""
        return self.box_labels[self.box_offsets[i] : self.box_offsets[i + 1]]

    def labels_of(self, i: int) -> np.ndarray:
        """Int32 image-level class indices of image ``i``."""
        return self.labels[self.label_offsets[i] : self.label_offsets[i + 1]]

    def label_matrix(self) -> np.ndarray:
        """Multi-hot ``[n, num_classes]`` uint8 matrix of image-level labels."""
        out = np.zeros((len(self), self.num_classes), dtype=np.uint8)
        rows = np.repeat(np.arange(len(self)), np.diff(self.label_offsets))
        out[rows, self.labels] = 1
        return out

    def subset(self, indices) -> Records:
        """A new table with the images at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Records.from_records((self[int(i)] for i in idx), self.class_names, self.root)
