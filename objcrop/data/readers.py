"""One entry point for every dataset format: ``load_records(fmt, ...)``."""

from __future__ import annotations

import os

from objcrop.data.coco import read_coco
from objcrop.data.folder import read_folder
from objcrop.data.openimages import read_openimages
from objcrop.data.records import Records
from objcrop.data.voc import read_voc
from objcrop.data.webdataset import read_webdataset
from objcrop.data.yolo import read_yolo

__all__ = ["ANNOTATION_FILE_FORMATS", "FORMATS", "load_records"]

FORMATS = ("coco", "voc", "openimages", "yolo", "folder", "webdataset")

# What --annotations is for each format (None: the format takes none).
_ANNOTATIONS = {
    "coco": "the instances JSON",
    "voc": "the Annotations folder or an ImageSets list file",
    "openimages": "the boxes CSV",
    "yolo": "the labels folder",
    "folder": None,
    "webdataset": None,  # boxes come from each sample's json member
}
ANNOTATION_FILE_FORMATS = tuple(f for f in FORMATS if _ANNOTATIONS[f] is not None)  # those read from --annotations


def load_records(
    fmt: str,
    annotations: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None,
    classes_csv: str | os.PathLike | None = None,
) -> Records:
    """Reads a dataset of format ``fmt`` (one of :data:`FORMATS`).

    Args:
        fmt: Dataset format.
        annotations: COCO JSON, VOC Annotations folder or ImageSets list, OpenImages boxes CSV, or
            YOLO labels folder; not used by ``folder``.
        images: Folder of the images (always needed); for ``webdataset`` a folder of tar shards, a brace
            pattern (``shards/train-{000000..000009}.tar``) or one shard.
        labels_csv: OpenImages image-level labels CSV (only for ``openimages``).
        classes_csv: OpenImages class descriptions CSV, or a YOLO class names file (``data.yaml`` or
            one name per line).

    Raises:
        ValueError: Unknown format, or an argument missing or not used by the format (the message
            names the command-line flag).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if images is None:
        raise ValueError(f"format '{fmt}' needs --images (the folder of the images)")
    needs = _ANNOTATIONS[fmt]
    if needs is not None and annotations is None:
        raise ValueError(f"format '{fmt}' needs --annotations ({needs})")
    if needs is None and annotations is not None:
        raise ValueError(f"format '{fmt}' takes no --annotations (it reads only --images)")
    if labels_csv is not None and fmt != "openimages":
        raise ValueError(f"--labels-csv is only for format 'openimages', not '{fmt}'")
    if classes_csv is not None and fmt not in ("openimages", "yolo"):
        raise ValueError(f"--classes-csv is only for formats 'openimages' and 'yolo', not '{fmt}'")

    if fmt == "coco":
        return read_coco(annotations, images)
    if fmt == "voc":
        return read_voc(annotations, images)
    if fmt == "openimages":
        return read_openimages(annotations, images, labels_csv=labels_csv, classes_csv=classes_csv)
    if fmt == "yolo":
        return read_yolo(annotations, images, class_names=classes_csv)
    if fmt == "webdataset":
        return read_webdataset(images)
    return read_folder(images)
