"""One entry point for every dataset format: ``load_records(fmt, ...)``.

The formats are the table :data:`objcrop.registry.FORMATS` (one line each: the reader, what
``--annotations`` is for it, the optional files it takes); a reader is imported when it is used.
"""

from __future__ import annotations

import os

from objcrop.data.records import Records
from objcrop.registry import FORMATS as _REGISTRY
from objcrop.registry import import_target

__all__ = ["ANNOTATION_FILE_FORMATS", "FORMATS", "load_records"]

FORMATS = _REGISTRY.names()
ANNOTATION_FILE_FORMATS = tuple(f for f in FORMATS if _REGISTRY[f].annotations is not None)  # read --annotations

# The optional files, as the command line names them.
_FLAGS = {"labels_csv": "--labels-csv", "classes_csv": "--classes-csv"}


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
    if fmt not in _REGISTRY:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if images is None:
        raise ValueError(f"format '{fmt}' needs --images (the folder of the images)")
    spec = _REGISTRY[fmt]
    if spec.annotations is not None and annotations is None:
        raise ValueError(f"format '{fmt}' needs --annotations ({spec.annotations})")
    if spec.annotations is None and annotations is not None:
        raise ValueError(f"format '{fmt}' takes no --annotations (it reads only --images)")
    options = {}
    for option, value in (("labels_csv", labels_csv), ("classes_csv", classes_csv)):
        if value is None:
            continue
        if option not in spec.options:
            takers = [f"'{f}'" for f in FORMATS if option in _REGISTRY[f].options]
            noun = "format" if len(takers) == 1 else "formats"
            raise ValueError(f"{_FLAGS[option]} is only for {noun} {' and '.join(takers)}, not '{fmt}'")
        options[spec.options[option]] = value
    reader = import_target(spec.reader)
    if spec.annotations is None:
        return reader(images, **options)
    return reader(annotations, images, **options)
