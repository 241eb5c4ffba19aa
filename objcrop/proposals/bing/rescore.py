"""A small learned second look at BING's best windows.

BING's linear 8x8 filter ranks windows poorly on cluttered photos (COCO). The rescorer takes BING's best
``pool`` windows plus a fixed set of data-driven prior boxes (the boxes that cover the most training
objects, in image-relative coordinates), describes each box with a few cheap numbers and ranks them by a
logistic regression trained on the training images:

- BING's calibrated score and rank, whether the box is a prior;
- position and size (log width, log height, log aspect, centre, distance to the centre, image borders);
- colour contrast between the box and a ring around it (mean CIELAB per channel over pooled variance);
- edge density inside, in a ring outside, in the core and in a strip along the border, and edges running
  along versus across the border strips (a cheap stand-in for EdgeBoxes' contours that straddle the box).

Pixel statistics come from integral images of a small copy of the image (longest side ``SMALL`` pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numba as nb
import numpy as np

from objcrop import boxes as B

__all__ = ["SMALL", "NUM_FEATURES", "Rescorer", "box_features", "prior_boxes"]

SMALL = 160
# Channels of the integral image: L, a, b, L^2, a^2, b^2, |dL/dx|, |dL/dy|.
_CHANNELS = 8
NUM_FEATURES = 28


@nb.njit(cache=True, nogil=True)
def _region(ii, x1, y1, x2, y2, out):
    """Channel sums of a region of the image whose integral is ``ii`` (float coordinates rounded outwards,
    clamped, at least one pixel) into ``out``; returns its pixel count."""
    h, w = ii.shape[0] - 1, ii.shape[1] - 1
    a = min(max(int(np.floor(y1)), 0), h - 1)
    c = min(max(int(np.floor(x1)), 0), w - 1)
    b = min(max(int(np.ceil(y2)), a + 1), h)
    d = min(max(int(np.ceil(x2)), c + 1), w)
    for k in range(ii.shape[2]):
        out[k] = ii[b, d, k] - ii[a, d, k] - ii[b, c, k] + ii[a, c, k]
    return float((b - a) * (d - c))


@nb.njit(cache=True, nogil=True)
def _pixel_features(ii, boxes, g, out):
    """Colour contrast and edge features (``out[:, 0:12]``) of ``boxes`` in small-image coordinates."""
    s_in = np.empty(_CHANNELS)
    s_out = np.empty(_CHANNELS)
    s_core = np.empty(_CHANNELS)
    side = np.empty((4, _CHANNELS))
    t = 0.15
    for i in range(boxes.shape[0]):
        x1, y1, x2, y2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        bw, bh = x2 - x1, y2 - y1
        a_in = _region(ii, x1, y1, x2, y2, s_in)
        a_out = _region(ii, x1 - bw / 4, y1 - bh / 4, x2 + bw / 4, y2 + bh / 4, s_out)
        a_core = _region(ii, x1 + bw / 4, y1 + bh / 4, x2 - bw / 4, y2 - bh / 4, s_core)
        a_sides = _region(ii, x1, y1, x1 + t * bw, y2, side[0])
        a_sides += _region(ii, x2 - t * bw, y1, x2, y2, side[1])
        a_sides += _region(ii, x1, y1, x2, y1 + t * bh, side[2])
        a_sides += _region(ii, x1, y2 - t * bh, x2, y2, side[3])
        a_ring = max(a_out - a_in, 1.0)
        a_strip = max(a_in - a_core, 1.0)
        total = 0.0
        for k in range(3):
            m_in = s_in[k] / a_in
            m_ring = (s_out[k] - s_in[k]) / a_ring
            var_in = max(s_in[k + 3] / a_in - m_in * m_in, 0.0)
            var_ring = max((s_out[k + 3] - s_in[k + 3]) / a_ring - m_ring * m_ring, 0.0)
            contrast = (m_in - m_ring) ** 2 / (var_in + var_ring + 25.0)
            out[i, k] = np.log1p(contrast)
            total += contrast
        out[i, 3] = np.log1p(total)
        # Along the left/right strips, horizontal gradients run parallel to the border; vertical ones cross it.
        along = (side[0, 6] + side[1, 6] + side[2, 7] + side[3, 7]) / a_sides
        across = (side[0, 7] + side[1, 7] + side[2, 6] + side[3, 6]) / a_sides
        e_in = (s_in[6] + s_in[7]) / a_in
        e_ring = (s_out[6] + s_out[7] - s_in[6] - s_in[7]) / a_ring
        e_core = (s_core[6] + s_core[7]) / a_core
        e_strip = (s_in[6] + s_in[7] - s_core[6] - s_core[7]) / a_strip
        out[i, 4] = np.log1p(along / g)
        out[i, 5] = np.log1p(across / g)
        out[i, 6] = np.log((along + 1) / (across + 1))
        out[i, 7] = np.log1p(e_in / g)
        out[i, 8] = np.log1p(e_ring / g)
        out[i, 9] = np.log1p(e_core / g)
        out[i, 10] = np.log1p(e_strip / g)
        out[i, 11] = np.log((e_strip + 1) / (e_ring + 1))


def _integral(rgb: np.ndarray) -> tuple[np.ndarray, float, float]:
    height, width = rgb.shape[:2]
    scale = SMALL / max(height, width)
    w, h = max(2, round(width * scale)), max(2, round(height * scale))
    # Two bilinear steps of about 2x average like a box filter at a fraction of INTER_AREA's cost.
    half = cv2.resize(rgb, (min(2 * w, width), min(2 * h, height)), interpolation=cv2.INTER_LINEAR)
    small = cv2.resize(half, (w, h), interpolation=cv2.INTER_LINEAR)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2Lab).astype(np.float32)
    lum = np.ascontiguousarray(lab[:, :, 0])
    gx = np.abs(cv2.Sobel(lum, cv2.CV_32F, 1, 0, ksize=3))
    gy = np.abs(cv2.Sobel(lum, cv2.CV_32F, 0, 1, ksize=3))
    planes = np.dstack([lab, lab * lab, gx, gy]).astype(np.float64)
    return cv2.integral(planes), w / width, h / height


def box_features(rgb: np.ndarray, boxes: np.ndarray, score: np.ndarray, rank: np.ndarray, prior: np.ndarray):
    """The rescorer's float32 ``[n, NUM_FEATURES]`` description of ``boxes`` (xyxy pixels of ``rgb``).

    Args:
        rgb: Uint8 HxWx3 image.
        boxes: Float32 ``[n, 4]``.
        score: BING's calibrated score of each box (any constant for priors).
        rank: Rank in BING's list over the pool size (or in the prior list over its length).
        prior: 1 for prior boxes, 0 for BING's.
    """
    height, width = rgb.shape[:2]
    ii, sx, sy = _integral(rgb)
    g = max(float(ii[-1, -1, 6] + ii[-1, -1, 7]) / ((ii.shape[0] - 1) * (ii.shape[1] - 1)), 1e-3)
    box = np.asarray(boxes, np.float64).reshape(-1, 4)
    pixel = np.empty((len(box), 12), np.float64)
    _pixel_features(ii, box * np.array([sx, sy, sx, sy]), g, pixel)
    cx, cy = (box[:, 0] + box[:, 2]) / (2 * width), (box[:, 1] + box[:, 3]) / (2 * height)
    rw = np.maximum(box[:, 2] - box[:, 0], 1) / width
    rh = np.maximum(box[:, 3] - box[:, 1], 1) / height
    touch = np.stack([box[:, 0] <= 1, box[:, 1] <= 1, box[:, 2] >= width - 1, box[:, 3] >= height - 1], axis=1)
    geometry = [np.log(rw), np.log(rh), np.log(rw / rh), cx, cy, np.abs(cx - 0.5), np.abs(cy - 0.5)]
    features = np.column_stack(
        [score, rank, prior, prior * rank, *geometry, touch, pixel, np.full(len(box), np.log1p(g))]
    )
    return features.astype(np.float32)


def prior_boxes(relative_gt: np.ndarray, count: int) -> np.ndarray:
    """``count`` boxes (image-relative xyxy) chosen greedily among ``relative_gt`` to cover the most of them at
    IoU >= 0.5 (IoU does not change when both axes are scaled, so one set serves every image size)."""
    gt = B.as_boxes(relative_gt)
    if len(gt) == 0:
        return np.zeros((0, 4), np.float32)
    covers = B.iou(gt, gt) >= 0.5  # [candidate, object]
    covered = np.zeros(len(gt), bool)
    chosen = []
    for _ in range(min(count, len(gt))):
        gain = covers[:, ~covered].sum(axis=1)
        j = int(np.argmax(gain))
        if gain[j] == 0:
            break
        chosen.append(j)
        covered |= covers[j]
    return gt[chosen]


@dataclass(frozen=True, eq=False)
class Rescorer:
    """Logistic regression over :func:`box_features` of BING's ``pool`` best windows and the prior boxes.

    Attributes:
        pool: How many of BING's windows are rescored.
        priors: Float32 ``[P, 4]`` image-relative prior boxes.
        mean: Float32 ``[F]`` feature means (standardization).
        scale: Float32 ``[F]`` feature standard deviations.
        weights: Float32 ``[F]`` logistic regression weights on standardized features.
        bias: The regression's intercept.
    """

    pool: int
    priors: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def __post_init__(self) -> None:
        for name in ("priors", "mean", "scale", "weights"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float32))
        if self.priors.ndim != 2 or self.priors.shape[1] != 4:
            raise ValueError(f"priors must be [P, 4], got {self.priors.shape}")
        if not self.mean.shape == self.scale.shape == self.weights.shape == (NUM_FEATURES,):
            raise ValueError(f"rescorer arrays must have {NUM_FEATURES} features")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")

    def candidates(self, rgb: np.ndarray, boxes: np.ndarray, scores: np.ndarray):
        """BING's windows plus the priors in pixels of ``rgb``, and their features."""
        height, width = rgb.shape[:2]
        priors = self.priors * np.array([width, height, width, height], np.float32)
        n, p = len(boxes), len(priors)
        all_boxes = np.concatenate([boxes, priors]).astype(np.float32)
        floor = float(scores.min()) if n else 0.0
        features = box_features(
            rgb,
            all_boxes,
            np.concatenate([scores, np.full(p, floor, np.float32)]),
            np.concatenate([np.arange(n) / self.pool, np.arange(p) / max(p, 1)]),
            np.concatenate([np.zeros(n), np.ones(p)]),
        )
        return all_boxes, features

    def score(self, features: np.ndarray) -> np.ndarray:
        """Log-odds that each box covers an object (IoU >= 0.5)."""
        return ((features - self.mean) / self.scale) @ self.weights + np.float32(self.bias)

    def rerank(self, rgb: np.ndarray, boxes: np.ndarray, scores: np.ndarray, topk: int):
        """The ``topk`` best of BING's windows and the priors by rescored log-odds, best first."""
        all_boxes, features = self.candidates(rgb, boxes, scores)
        logit = self.score(features)
        order = np.argsort(-logit, kind="stable")[:topk]
        return all_boxes[order], logit[order].astype(np.float32)
