"""COCO "instances" JSON reader."""

from __future__ import annotations

import json
import os
from typing import NoReturn

import numpy as np

from objcrop.boxes import xywh_to_xyxy
from objcrop.data._common import build_records, existing_images, size_problem
from objcrop.data.records import Records

__all__ = ["read_coco"]


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "COCO annotation file not found", path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO instances file (no 'images' list)")
    if not isinstance(data.get("categories"), list):
        raise ValueError(f"{path}: not a COCO instances file (no 'categories' list)")
    return data


def _field(entry, key: str, kind, path: str, what: str):
    """``kind(entry[key])`` or a ValueError naming the file and the entry."""
    try:
        return kind(entry[key])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {what}: missing or invalid '{key}' ({err!r})") from err


def _bbox(ann: dict, path: str, what: str) -> list[float]:
    box = ann.get("bbox")
    if not isinstance(box, list):
        raise ValueError(f"{path}: {what}: 'bbox' must be 4 numbers, got {box!r}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {what}: 'bbox' must be 4 numbers, got {box!r}") from err
    if len(values) != 4:
        raise ValueError(f"{path}: {what}: 'bbox' must be 4 numbers, got {box!r}")
    return values


def _name(ann, k: int) -> str:
    return f"annotation {ann.get('id', f'#{k}')}" if isinstance(ann, dict) else f"annotation #{k}"


def _raise_annotation_error(ann, k: int, path: str, image_index: dict, cat_index: dict) -> NoReturn:
    """Finds out what is wrong with an annotation that the fast path rejected, and says so."""
    what = _name(ann, k)
    iid = _field(ann, "image_id", int, path, what)
    cid = _field(ann, "category_id", int, path, what)
    if iid not in image_index:
        raise ValueError(f"{path}: {what}: unknown image_id {iid}")
    if cid not in cat_index:
        raise ValueError(f"{path}: {what}: unknown category_id {cid}")
    raise ValueError(f"{path}: {what}: image_id and category_id must be JSON numbers")


def _bbox_array(box_anns: list[tuple[int, dict]], path: str) -> np.ndarray:
    """``[M, 4]`` float64 COCO boxes, or a ValueError naming the first malformed annotation."""
    try:
        boxes = np.array([ann["bbox"] for _, ann in box_anns], dtype=np.float64)
        if boxes.shape == (len(box_anns), 4) or not box_anns:
            return boxes.reshape(-1, 4)
    except (KeyError, TypeError, ValueError):
        pass
    for k, ann in box_anns:
        _bbox(ann, path, _name(ann, k))
    raise ValueError(f"{path}: malformed 'bbox' values")


def read_coco(annotations_json: str | os.PathLike, images_dir: str | os.PathLike, check_images: bool = True) -> Records:
    """Reads a COCO instances JSON.

    Category ids (sparse, 1..90 for COCO) become contiguous indices in sorted-id order, and
    ``class_names`` are the category names in that order. Crowd annotations (``iscrowd=1``) give no
    box but their category counts as an image-level label; image-level labels are the categories of
    all annotations of an image. Images without annotations are kept (no boxes). Boxes are clipped to
    the image; unusable ones (NaN, empty, outside) are dropped, counted and logged once. Images
    whose file is missing are skipped with their annotations, counted and logged once.

    Args:
        annotations_json: The instances JSON.
        images_dir: Folder that the images' ``file_name`` is relative to.
        check_images: Skip images whose file is missing (off: read the annotations alone).

    Returns:
        Records with the JSON's image sizes and COCO image ids, in the JSON's image order.

    Raises:
        ValueError: A malformed entry (named by image or annotation id), an image size that is not
            finite, below 1 or too large to store, or (``check_images``) no image file exists.
    """
    path = os.fspath(annotations_json)
    data = _load_json(path)

    cat_ids, cat_names = [], {}
    for k, cat in enumerate(data["categories"]):
        cid = _field(cat, "id", int, path, f"category #{k}")
        if cid in cat_names:
            raise ValueError(f"{path}: duplicate category id {cid}")
        cat_ids.append(cid)
        cat_names[cid] = str(cat.get("name", cid))
    cat_ids.sort()
    cat_index = {cid: i for i, cid in enumerate(cat_ids)}

    images = data["images"]
    image_index: dict[int, int] = {}
    paths, widths, heights = [], [], []
    for k, img in enumerate(images):
        iid = _field(img, "id", int, path, f"image #{k}")
        if not -(2**63) <= iid < 2**63:  # image ids are stored as int64
            raise ValueError(f"{path}: image #{k}: id {iid} does not fit int64")
        if iid in image_index:
            raise ValueError(f"{path}: duplicate image id {iid}")
        image_index[iid] = k
        name = _field(img, "file_name", str, path, f"image {iid}")
        paths.append(name)
        width = _field(img, "width", float, path, f"image {iid} ({name})")
        height = _field(img, "height", float, path, f"image {iid} ({name})")
        problem = size_problem(width, height)
        if problem is not None:
            raise ValueError(f"{path}: image {iid} ({name}): invalid size {width:g}x{height:g} ({problem})")
        widths.append(int(width))
        heights.append(int(height))

    box_anns, box_labels, box_image = [], [], []
    labels, label_image = [], []
    for k, ann in enumerate(data.get("annotations") or []):
        try:
            i, c = image_index[ann["image_id"]], cat_index[ann["category_id"]]
            crowd = ann.get("iscrowd", 0)
        except (KeyError, TypeError, AttributeError):
            _raise_annotation_error(ann, k, path, image_index, cat_index)
        labels.append(c)
        label_image.append(i)
        if not crowd:
            box_anns.append((k, ann))
            box_labels.append(c)
            box_image.append(i)

    boxes = xywh_to_xyxy(_bbox_array(box_anns, path))
    box_image, label_image = np.asarray(box_image, np.int64), np.asarray(label_image, np.int64)
    image_ids = np.asarray(list(image_index), np.int64)
    if check_images:
        ok = existing_images(images_dir, paths, source=path)
        new_index = np.cumsum(ok) - 1
        box_ok, label_ok = ok[box_image], ok[label_image]
        boxes, box_labels, box_image = boxes[box_ok], np.asarray(box_labels)[box_ok], new_index[box_image[box_ok]]
        labels, label_image = np.asarray(labels)[label_ok], new_index[label_image[label_ok]]
        paths, image_ids = [p for p, keep in zip(paths, ok, strict=True) if keep], image_ids[ok]
        widths, heights = np.asarray(widths)[ok], np.asarray(heights)[ok]
    return build_records(
        root=images_dir,
        paths=paths,
        widths=widths,
        heights=heights,
        boxes=boxes,
        box_labels=box_labels,
        box_image=box_image,
        labels=labels,
        label_image=label_image,
        class_names=[cat_names[c] for c in cat_ids],
        image_ids=image_ids,
        source=path,
    )
