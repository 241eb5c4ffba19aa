"""YOLO txt reader (one ``class cx cy w h`` line per object, normalized to the image size)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from objcrop.boxes import cxcywh_norm_to_xyxy
from objcrop.data._common import build_records, ids_from_stems, list_images, logger, read_sizes
from objcrop.data.records import Records

__all__ = ["MAX_UNNAMED_CLASSES", "read_yolo", "read_class_names"]

# Without a class names file the classes are "0".."C-1" for the largest id C - 1 found; a larger id is
# a typo (or "1e9") and would make every per-class table that large.
MAX_UNNAMED_CLASSES = 10_000


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a YOLO ``data.yaml`` (``names`` as a list or an ``{index: name}`` map) or a
    text file with one name per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "class names file not found", str(path))
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            try:
                index = {int(k): str(v) for k, v in names.items()}
            except ValueError as err:
                raise ValueError(f"{path}: 'names' keys must be class indices") from err
            if sorted(index) != list(range(len(index))):
                raise ValueError(f"{path}: 'names' keys must be 0..{len(index) - 1}, got {sorted(index)}")
            return [index[i] for i in range(len(index))]
        if not isinstance(names, list):
            raise ValueError(f"{path}: no 'names' list or mapping")
        return [str(n) for n in names]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parse_label_file(path: Path, names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Normalized ``[N, 4]`` cxcywh boxes and ``[N]`` classes; polygon lines become their bounding box.

    A class must index ``names`` (below :data:`MAX_UNNAMED_CLASSES` without names)."""
    boxes, classes = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    values = [float(v) for v in parts]
                except ValueError:
                    raise ValueError(f"{path}:{line_no}: non-numeric value in {line.strip()!r}") from None
                cls = values[0]
                if not cls.is_integer() or cls < 0:
                    raise ValueError(f"{path}:{line_no}: class must be a non-negative integer, got {parts[0]!r}")
                if names is not None and cls >= len(names):
                    raise ValueError(f"{path}:{line_no}: class index {int(cls)} but only {len(names)} class names")
                if names is None and cls >= MAX_UNNAMED_CLASSES:
                    raise ValueError(
                        f"{path}:{line_no}: class {parts[0]!r} is beyond {MAX_UNNAMED_CLASSES - 1}, the largest id "
                        "read without a class names file; give the names (--classes-csv data.yaml)"
                    )
                if len(values) == 5:
                    boxes.append(values[1:])
                elif len(values) >= 7 and len(values) % 2 == 1:  # segmentation polygon x1 y1 x2 y2 ...
                    xs, ys = values[1::2], values[2::2]
                    x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
                    boxes.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
                else:
                    raise ValueError(f"{path}:{line_no}: expected 'class cx cy w h' or a polygon, got {line.strip()!r}")
                classes.append(int(cls))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int32)


def read_yolo(
    labels_dir: str | os.PathLike,
    images_dir: str | os.PathLike,
    class_names: str | os.PathLike | Sequence[str] | None = None,
) -> Records:
    """Reads YOLO txt labels for every image under ``images_dir``.

    The label of ``images_dir/a/b.jpg`` is ``labels_dir/a/b.txt``; an image without a label file has
    no boxes. Sizes come from the image headers; unreadable images are counted, logged and skipped.
    Label files without an image are counted and logged.

    Args:
        labels_dir: Folder of ``.txt`` label files.
        images_dir: Folder of images (searched recursively).
        class_names: Names as a sequence, or a file (``data.yaml`` with ``names``, or one name per
            line). Default: ``"0"`` .. ``"C-1"`` with ``C`` the largest class index + 1, which
            must be below :data:`MAX_UNNAMED_CLASSES`.

    Returns:
        Records sorted by path; image ids are the file stems when all stems are numbers.
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise FileNotFoundError(2, "YOLO labels folder not found", str(labels_dir))
    names = read_class_names(class_names) if isinstance(class_names, (str, os.PathLike)) else class_names
    keys = list_images(images_dir)
    ok, widths, heights = read_sizes(images_dir, keys, "image sizes")

    parsed, used = [], set()
    for key, readable in zip(keys, ok, strict=True):
        label_path = labels_dir / Path(key).with_suffix(".txt")
        used.add(label_path.relative_to(labels_dir).as_posix())
        if readable and label_path.is_file():
            parsed.append(_parse_label_file(label_path, names))
        else:
            parsed.append((np.zeros((0, 4), np.float32), np.zeros(0, np.int32)))
    orphans = sorted(p.relative_to(labels_dir).as_posix() for p in labels_dir.rglob("*.txt"))
    orphans = [p for p in orphans if p not in used]
    if orphans:
        logger.warning("%s: %d label files have no image (%s)", labels_dir, len(orphans), ", ".join(orphans[:5]))

    if names is None:  # bounded: every id is below MAX_UNNAMED_CLASSES
        names = [str(i) for i in range(max((int(c.max()) + 1 for _, c in parsed if len(c)), default=0))]

    kept = np.flatnonzero(ok)
    counts = np.array([len(parsed[k][1]) for k in kept], np.int64)
    box_image = np.repeat(np.arange(len(kept)), counts)
    box_labels = np.concatenate([parsed[k][1] for k in kept] or [np.zeros(0, np.int32)])
    norm = np.concatenate([parsed[k][0] for k in kept] or [np.zeros((0, 4), np.float32)])
    # One call for all boxes: per-box image sizes broadcast like scalars.
    boxes = cxcywh_norm_to_xyxy(norm, widths[kept][box_image], heights[kept][box_image])
    kept_keys = [keys[k] for k in kept]
    return build_records(
        root=images_dir,
        paths=kept_keys,
        widths=widths[kept],
        heights=heights[kept],
        boxes=boxes,
        box_labels=box_labels,
        box_image=box_image,
        labels=box_labels,
        label_image=box_image,
        class_names=names,
        image_ids=ids_from_stems([Path(k).stem for k in kept_keys]),
        source=labels_dir,
    )
