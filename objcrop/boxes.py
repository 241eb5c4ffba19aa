"""Box geometry. Boxes are float xyxy pixel coordinates of the original image, shape ``[N, 4]``.

Every function here works on numpy arrays, takes the image size where the image bounds matter,
and never touches pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "as_boxes",
    "area",
    "clip",
    "iou",
    "valid_mask",
    "sanitize",
    "dilate",
    "shift",
    "expand_to_min_size",
    "xywh_to_xyxy",
    "cxcywh_norm_to_xyxy",
]


def as_boxes(boxes) -> np.ndarray:
    """Returns ``boxes`` as a float32 ``[N, 4]`` array (a single box becomes ``[1, 4]``)."""
    arr = np.asarray(boxes, dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {arr.shape}")
    return arr


def area(boxes) -> np.ndarray:
    """Areas of xyxy boxes; inverted boxes have area 0."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def clip(boxes, width: float, height: float) -> np.ndarray:
    """Clips boxes to the image ``[0, width] x [0, height]``."""
    b = as_boxes(boxes).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    return b


def iou(a, b) -> np.ndarray:
    """Pairwise intersection over union, ``[len(a), len(b)]``."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / union, 0.0)
    return out.astype(np.float32)


def valid_mask(boxes, width: float | None = None, height: float | None = None, min_size: float = 1.0) -> np.ndarray:
    """True for boxes that are finite, have sides of at least ``min_size`` pixels and, when the
    image size is given, overlap the image."""
    b = as_boxes(boxes)
    ok = np.isfinite(b).all(axis=1)
    with np.errstate(invalid="ignore"):
        ok &= (b[:, 2] - b[:, 0] >= min_size) & (b[:, 3] - b[:, 1] >= min_size)
        if width is not None and height is not None:
            ok &= (b[:, 2] > 0) & (b[:, 3] > 0) & (b[:, 0] < width) & (b[:, 1] < height)
    return ok


def sanitize(boxes, width: float, height: float, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clips boxes to the image and drops the unusable ones (NaN/inf, zero-area, outside).

    Returns:
        The kept, clipped boxes and the boolean mask of kept input rows.
    """
    b = as_boxes(boxes)
    finite = np.isfinite(b).all(axis=1)
    clipped = clip(np.where(finite[:, None], b, 0), width, height)
    keep = finite & valid_mask(clipped, width, height, min_size)
    return clipped[keep], keep


def dilate(boxes, delta: float, width: float, height: float) -> np.ndarray:
    """Grows every side by ``delta * width`` (x) and ``delta * height`` (y), then clips.

    This is the paper's dilation. The official release computed ``x1 - x1 * delta``, which
    scales each coordinate by itself (a box at the left edge never grows left); we don't.
    """
    b = as_boxes(boxes).copy()
    dx, dy = delta * width, delta * height
    b += np.array([-dx, -dy, dx, dy], dtype=np.float32)
    return clip(b, width, height)


def _fit_inside(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Translates boxes (keeping their size, up to the image size) so that they lie inside the image."""
    b = boxes.copy()
    w = np.minimum(b[:, 2] - b[:, 0], width)
    h = np.minimum(b[:, 3] - b[:, 1], height)
    x1 = np.clip(b[:, 0], 0, width - w)
    y1 = np.clip(b[:, 1], 0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def shift(
    boxes,
    radius: tuple[float, float] | float,
    width: float,
    height: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Moves each box by a radius drawn uniformly from ``radius`` (pixels) in a uniformly random
    direction, then translates it back inside the image if it left it."""
    b = as_boxes(boxes)
    lo, hi = (radius, radius) if np.isscalar(radius) else radius
    r = rng.uniform(lo, hi, size=len(b))
    theta = rng.uniform(0, 2 * np.pi, size=len(b))
    d = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).astype(np.float32)
    moved = b + np.concatenate([d, d], axis=1)
    return _fit_inside(moved, width, height)


def expand_to_min_size(boxes, min_size: float, width: float, height: float) -> np.ndarray:
    """Grows boxes whose side is below ``min_size`` around their centre to ``min_size`` (capped at
    the image size) and shifts them to stay inside the image (the paper's appendix G)."""
    b = as_boxes(boxes)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w = np.minimum(np.maximum(b[:, 2] - b[:, 0], min_size), width)
    h = np.minimum(np.maximum(b[:, 3] - b[:, 1], min_size), height)
    grown = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return _fit_inside(grown, width, height)


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``[x, y, w, h]`` to xyxy."""
    b = as_boxes(boxes).copy()
    b[:, 2:] += b[:, :2]
    return b


def cxcywh_norm_to_xyxy(boxes, width: float, height: float) -> np.ndarray:
    """YOLO normalized ``[cx, cy, w, h]`` to xyxy pixels."""
    b = as_boxes(boxes)
    cx, cy, w, h = b[:, 0] * width, b[:, 1] * height, b[:, 2] * width, b[:, 3] * height
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
