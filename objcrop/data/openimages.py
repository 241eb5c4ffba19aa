"""OpenImages V6 CSV reader and the paper's OpenImages subset (classes with >= 900 images, images
with >= 2 of those classes).

The CSVs are streamed with the ``csv`` module; per-row values go into compact arrays, so the
14.6M-row train boxes file stays well within memory.
"""

from __future__ import annotations

import csv
import logging
import operator
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from objcrop.data._common import build_records, read_sizes, unique_counts
from objcrop.data.records import Records
from objcrop.io import atomic_open, check_replaceable

__all__ = [
    "BOX_COLUMNS",
    "LABEL_COLUMNS",
    "read_openimages",
    "read_class_descriptions",
    "IDS_HEADER",
    "OpenImagesSubset",
    "check_ids_out",
    "ids_file_is_ours",
    "openimages_subset",
]

logger = logging.getLogger(__name__)

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")


def _read_csv(path: str | os.PathLike, columns: Sequence[str], desc: str) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Yields ``(line number, values of columns)`` for each row of a CSV with a header (two columns or more).

    Raises:
        ValueError: The header lacks one of ``columns``, or a row is too short.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "CSV file not found", path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty CSV (no header)")
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (header: {header})")
        idx = [header.index(c) for c in columns]
        pick = operator.itemgetter(*idx)
        width = max(idx) + 1
        for row in tqdm(reader, desc=desc, unit=" rows", disable=None, leave=False, mininterval=1.0):
            if len(row) < width:
                if not row:
                    continue
                raise ValueError(f"{path}:{reader.line_num}: expected at least {width} fields, got {len(row)}")
            yield reader.line_num, pick(row)


def _float(value: str, path, line: int, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{os.fspath(path)}:{line}: non-numeric {column} {value!r}") from None


def read_class_descriptions(classes_csv: str | os.PathLike) -> dict[str, str]:
    """``{LabelName: DisplayName}`` from a class descriptions CSV (with or without a header row)."""
    path = os.fspath(classes_csv)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "class descriptions CSV not found", path)
    names = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: line {len(names) + 1}: expected 'LabelName,DisplayName', got {row}")
            mid = row[0].strip().lstrip("\ufeff")
            if mid != "LabelName":
                names[mid] = row[1].strip()
    return names


def read_openimages(
    boxes_csv: str | os.PathLike,
    images_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    classes_csv: str | os.PathLike | None = None,
) -> Records:
    """Reads OpenImages V6 boxes (and optionally image-level labels) for the images on disk.

    The boxes CSV defines the images (``<ImageID>.jpg`` in ``images_dir``). Sizes come from the
    image headers since the CSV coordinates are normalized; images missing on disk or unreadable
    are counted, logged and skipped. Image-level labels are the classes of an image's boxes plus its
    positive (``Confidence == 1``) rows of ``labels_csv``; label rows of images without boxes are
    ignored. Classes are all LabelNames used, sorted by LabelName (so use the "boxable" label and
    class files to stay with the 600 box classes).

    Args:
        boxes_csv: ``*-annotations-bbox.csv`` (ImageID, LabelName, XMin, XMax, YMin, YMax, ...).
        images_dir: Folder of ``<ImageID>.jpg``.
        labels_csv: ``*-annotations-human-imagelabels*.csv`` (ImageID, LabelName, Confidence, ...).
        classes_csv: Class descriptions ``LabelName,DisplayName``; without it classes are named by
            their LabelName.

    Returns:
        Records sorted by ImageID; ``image_ids`` are running indices (ImageIDs are the path stems).
    """
    image_index: dict[str, int] = {}
    class_index: dict[str, int] = {}
    box_image, box_class, coords = array("q"), array("q"), array("d")
    for line, (iid, mid, xmin, xmax, ymin, ymax) in _read_csv(boxes_csv, BOX_COLUMNS, "boxes"):
        box_image.append(image_index.setdefault(iid, len(image_index)))
        box_class.append(class_index.setdefault(mid, len(class_index)))
        try:
            coords.extend((float(xmin), float(ymin), float(xmax), float(ymax)))
        except ValueError:
            for name, v in (("XMin", xmin), ("YMin", ymin), ("XMax", xmax), ("YMax", ymax)):
                _float(v, boxes_csv, line, name)  # raises, naming the column

    label_image, label_class = array("q"), array("q")
    if labels_csv is not None:
        for line, (iid, mid, conf) in _read_csv(labels_csv, LABEL_COLUMNS, "labels"):
            if iid in image_index and _float(conf, labels_csv, line, "Confidence") == 1:
                label_image.append(image_index[iid])
                label_class.append(class_index.setdefault(mid, len(class_index)))

    mids = sorted(class_index)
    remap = np.empty(len(mids), np.int64)
    remap[[class_index[m] for m in mids]] = np.arange(len(mids))
    names = _display_names(mids, classes_csv)

    keys = sorted(image_index)
    position = np.empty(len(keys), np.int64)  # CSV order -> sorted order
    position[[image_index[k] for k in keys]] = np.arange(len(keys))
    ok, widths, heights = read_sizes(images_dir, [f"{k}.jpg" for k in keys], "image sizes")
    new_index = np.where(ok, np.cumsum(ok) - 1, -1)  # sorted order -> index among readable images

    box_image = new_index[position[np.frombuffer(box_image, np.int64)]]
    box_class = remap[np.frombuffer(box_class, np.int64)]
    on_disk = box_image >= 0
    box_image, box_class = box_image[on_disk], box_class[on_disk]
    scale = np.stack([widths[ok], heights[ok]] * 2, axis=1).astype(np.float64)
    boxes = np.frombuffer(coords, np.float64).reshape(-1, 4)[on_disk] * scale[box_image]
    label_image = new_index[position[np.frombuffer(label_image, np.int64)]]
    label_class = remap[np.frombuffer(label_class, np.int64)]
    return build_records(
        root=images_dir,
        paths=[f"{k}.jpg" for k, readable in zip(keys, ok, strict=True) if readable],
        widths=widths[ok],
        heights=heights[ok],
        boxes=boxes.astype(np.float32),
        box_labels=box_class,
        box_image=box_image,
        labels=np.concatenate([box_class, label_class[label_image >= 0]]),
        label_image=np.concatenate([box_image, label_image[label_image >= 0]]),
        class_names=names,
        source=boxes_csv,
    )


def _display_names(mids: Sequence[str], classes_csv) -> list[str]:
    if classes_csv is None:
        return list(mids)
    table = read_class_descriptions(classes_csv)
    unnamed = [m for m in mids if m not in table]
    if unnamed:
        logger.warning(
            "%s: %d classes have no description, named by LabelName (%s)", classes_csv, len(unnamed), unnamed[:5]
        )
    return [table.get(m, m) for m in mids]


# The first line of an id list written by ``objcrop openimages-subset``: the proof that a later run may
# replace the file (lists written before the header existed count as foreign). ImageIDs never start with '#'.
IDS_HEADER = "# objcrop openimages-subset: kept ImageIDs, one per line"


def ids_file_is_ours(path: Path) -> bool:
    """Whether ``path`` starts with :data:`IDS_HEADER`."""
    try:
        with open(path, "rb") as f:
            return f.readline().rstrip(b"\r\n") == IDS_HEADER.encode()
    except OSError:
        return False


def check_ids_out(path: str | os.PathLike) -> Path:
    """``path`` when an id list may be written there: absent, or an id list objcrop wrote."""
    return check_replaceable(path, ids_file_is_ours)


@dataclass
class OpenImagesSubset:
    """Result of :func:`openimages_subset`.

    Attributes:
        image_ids: Kept ImageIDs, sorted.
        class_ids: Kept LabelNames, sorted.
        class_image_counts: Number of kept images that contain each kept class.
        images_before: Images in the boxes CSV.
        classes_before: Classes of those images (boxes plus positive image-level labels).
        boxes_before: Rows of the boxes CSV.
        boxes_after: Boxes of kept classes in kept images.
    """

    image_ids: list[str]
    class_ids: list[str]
    class_image_counts: np.ndarray
    images_before: int
    classes_before: int
    boxes_before: int
    boxes_after: int

    @property
    def images_after(self) -> int:
        """Images kept by the subset."""
        return len(self.image_ids)

    @property
    def classes_after(self) -> int:
        """Classes kept by the subset."""
        return len(self.class_ids)

    def counts(self) -> dict[str, int]:
        """The before/after counts as a plain dict (for printing or JSON)."""
        return {
            "images_before": self.images_before,
            "images_after": self.images_after,
            "classes_before": self.classes_before,
            "classes_after": self.classes_after,
            "boxes_before": self.boxes_before,
            "boxes_after": self.boxes_after,
            "min_images_in_a_kept_class": int(self.class_image_counts.min()) if len(self.class_ids) else 0,
        }

    def write_image_ids(self, path: str | os.PathLike) -> None:
        """Writes the kept ImageIDs, one per line after the :data:`IDS_HEADER` line, atomically (temp file in
        the same folder, then rename).

        Raises:
            ValueError: ``path`` holds a file that is not an id list objcrop wrote (see :func:`check_ids_out`).
        """
        check_ids_out(path)
        with atomic_open(path, "w") as f:
            f.write(IDS_HEADER + "\n")
            f.writelines(f"{i}\n" for i in self.image_ids)


def openimages_subset(
    boxes_csv: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    min_images_per_class: int = 900,
    min_classes_per_image: int = 2,
) -> OpenImagesSubset:
    """The paper's OpenImages subset: keep classes present in at least ``min_images_per_class``
    images, then keep images holding at least ``min_classes_per_image`` distinct kept classes.

    A class is present in an image when the image has a box of it, or (with ``labels_csv``) a
    positive image-level label of it. Only images of the boxes CSV are candidates. Both rules are
    applied once, in that order (a kept class may end with fewer images once images are dropped;
    ``class_image_counts`` shows it).
    """
    image_index: dict[str, int] = {}
    class_index: dict[str, int] = {}
    box_codes = array("q")  # image << 32 | class, one per box
    for _, (iid, mid) in _read_csv(boxes_csv, ("ImageID", "LabelName"), "boxes"):
        i = image_index.setdefault(iid, len(image_index))
        box_codes.append(i << 32 | class_index.setdefault(mid, len(class_index)))
    label_codes = array("q")
    if labels_csv is not None:
        for line, (iid, mid, conf) in _read_csv(labels_csv, LABEL_COLUMNS, "labels"):
            if iid in image_index and _float(conf, labels_csv, line, "Confidence") == 1:
                label_codes.append(image_index[iid] << 32 | class_index.setdefault(mid, len(class_index)))

    box_pairs, boxes_per_pair = unique_counts(np.frombuffer(box_codes, np.int64))
    pairs, _ = unique_counts(np.concatenate([box_pairs, np.frombuffer(label_codes, np.int64)]))
    pair_image, pair_class = pairs >> 32, pairs & 0xFFFFFFFF
    n_images, n_classes = len(image_index), len(class_index)

    keep_class = np.bincount(pair_class, minlength=n_classes) >= min_images_per_class
    in_kept_class = keep_class[pair_class]
    keep_image = np.bincount(pair_image[in_kept_class], minlength=n_images) >= min_classes_per_image
    final = in_kept_class & keep_image[pair_image]
    class_counts = np.bincount(pair_class[final], minlength=n_classes)

    box_kept = keep_class[box_pairs & 0xFFFFFFFF] & keep_image[box_pairs >> 32]
    image_names = np.array(list(image_index), dtype=object)
    class_names = np.array(list(class_index), dtype=object)
    class_order = sorted(np.flatnonzero(keep_class), key=lambda c: class_names[c])
    return OpenImagesSubset(
        image_ids=sorted(image_names[keep_image].tolist()),
        class_ids=[class_names[c] for c in class_order],
        class_image_counts=class_counts[class_order].astype(np.int64),
        images_before=n_images,
        classes_before=n_classes,
        boxes_before=len(box_codes),
        boxes_after=int(boxes_per_pair[box_kept].sum()),
    )
