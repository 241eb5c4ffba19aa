"""COCO box AP of detections with pycocotools: ground truth from Records or the original JSON.

Detections inside objcrop are flat numpy arrays (xyxy pixels, class indices ``0..C-1`` of the
detector's classes); they become COCO results (xywh, category ids) only here, at the border.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from objcrop.data.records import Records

__all__ = [
    "METRICS",
    "Detections",
    "GroundTruth",
    "coco_evaluate",
    "ground_truth_from_json",
    "ground_truth_from_records",
]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class Detections:
    """Detections of many images, flat.

    Attributes:
        image_ids: Int64 ``[K]`` dataset image id (``Records.image_ids``) of each detection.
        boxes: Float32 ``[K, 4]`` xyxy pixels of the original image.
        scores: Float32 ``[K]`` confidence.
        labels: Int64 ``[K]`` class index into the detector's class names.
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence[Detections]) -> Detections:
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.image_ids for p in parts]).astype(np.int64),
            np.concatenate([p.boxes for p in parts]).astype(np.float32).reshape(-1, 4),
            np.concatenate([p.scores for p in parts]).astype(np.float32),
            np.concatenate([p.labels for p in parts]).astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class GroundTruth:
    """A pycocotools ``COCO`` object and the category id of each detector class (-1: not in it)."""

    coco: COCO
    category_ids: np.ndarray


def _quiet_coco(dataset: dict | None = None, path: str | None = None) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        if path is not None:
            return COCO(path)
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _class_map(source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """Index in ``target`` of each name of ``source``, -1 where absent."""
    index = {name: i for i, name in enumerate(target)}
    return np.array([index.get(name, -1) for name in source], dtype=np.int64)


def ground_truth_from_records(records: Records, class_names: Sequence[str] | None = None) -> GroundTruth:
    """COCO ground truth built from the boxes of ``records`` (area = box area, no crowd regions).

    Args:
        records: The test set.
        class_names: The detector's classes (default: those of ``records``); category id = index + 1.
            Test classes are matched by name.

    Raises:
        ValueError: A test box of a class the detector does not know.
    """
    class_names = list(records.class_names if class_names is None else class_names)
    to_detector = _class_map(records.class_names, class_names)
    labels = to_detector[records.box_labels]
    if (labels < 0).any():
        unknown = sorted({records.class_names[c] for c in records.box_labels[labels < 0]})
        raise ValueError(f"test classes unknown to the detector: {unknown[:10]}")
    image_of_box = np.repeat(records.image_ids, np.diff(records.box_offsets))
    xywh = _xywh(records.boxes)
    images = [
        {"id": int(i), "width": int(w), "height": int(h), "file_name": records.key(k)}
        for k, (i, w, h) in enumerate(zip(records.image_ids, records.widths, records.heights, strict=True))
    ]
    annotations = [
        {
            "id": k + 1,
            "image_id": int(image_of_box[k]),
            "category_id": int(labels[k]) + 1,
            "bbox": xywh[k].tolist(),
            "area": float(xywh[k, 2] * xywh[k, 3]),
            "iscrowd": 0,
        }
        for k in range(len(xywh))
    ]
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(class_names)]
    coco = _quiet_coco({"images": images, "annotations": annotations, "categories": categories})
    return GroundTruth(coco, np.arange(1, len(class_names) + 1, dtype=np.int64))


def ground_truth_from_json(annotations_json: str | os.PathLike, class_names: Sequence[str]) -> GroundTruth:
    """The original COCO instances JSON as ground truth (the official protocol: crowd regions are
    ignored, object size ranges use the annotated segment areas).

    Detector classes are matched to the JSON's categories by name; detections of classes the JSON
    lacks are not scored.
    """
    path = os.fspath(annotations_json)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "COCO annotation file not found", path)
    coco = _quiet_coco(path=path)
    cats = sorted(coco.dataset.get("categories", []), key=lambda c: c["id"])
    names = [str(c.get("name", c["id"])) for c in cats]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: category names are not unique")
    # Position -1 (a class the JSON lacks) reads the appended -1.
    ids = np.array([c["id"] for c in cats] + [-1], dtype=np.int64)
    return GroundTruth(coco, ids[_class_map(class_names, names)])


def coco_evaluate(gt: GroundTruth, detections: Detections, image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Box AP of ``detections`` against ``gt`` with ``COCOeval``.

    Args:
        gt: Ground truth.
        detections: Detections on (a subset of) the ground truth's images; no detection at all gives AP 0.
        image_ids: Images that are scored (default: all images of ``gt``); pass the images that were
            actually run through the detector.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in ``[0, 1]``; -1 where no ground-truth box
        falls in that size range (pycocotools' convention).
    """
    category = gt.category_ids[np.asarray(detections.labels, np.int64)]
    keep = category >= 0
    xywh = _xywh(detections.boxes[keep])
    results = [
        {
            "id": k + 1,
            "image_id": int(i),
            "category_id": int(c),
            "bbox": box.tolist(),
            "score": float(s),
            "area": float(box[2] * box[3]),  # unmatched detections outside a size range are ignored there
        }
        for k, (i, c, box, s) in enumerate(
            zip(detections.image_ids[keep], category[keep], xywh, detections.scores[keep], strict=True)
        )
    ]
    known = set(gt.coco.getImgIds())
    stray = {r["image_id"] for r in results} - known
    if stray:
        raise ValueError(f"detections on images that are not in the ground truth: {sorted(stray)[:5]}")
    # Built by hand rather than with COCO.loadRes, which fails on an empty list. COCOeval takes the images and
    # categories from the ground truth, so the results need only their annotations.
    evaluator = COCOeval(gt.coco, _quiet_coco({"annotations": results}), iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(METRICS, evaluator.stats[:6], strict=True)}
