"""How much of what two views share is object: the statistic of the paper's appendix D.

For every sampled view pair we take the intersection of the two crop boxes and measure the share
of its area that lies inside the union of the image's ground-truth boxes. A policy whose views
agree on objects scores high; two random scene crops mostly agree on background.

The GT union is measured exactly, without rasterising at a chosen resolution: the box edges cut the
image into a non-uniform grid whose cells are either fully inside the union or fully outside, and a
summed-area table over that grid, interpolated bilinearly inside a cell (the covered area of
``[0, x] x [0, y]`` is bilinear within a cell), gives the covered area of any rectangle in O(log n)
for ``n`` boxes. Only geometry is involved, never pixels.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from objcrop import boxes as B
from objcrop.crops.policies import ViewPairPolicy

__all__ = ["UnionArea", "CoverageResult", "intersections", "coverage", "coverage_table"]

log = logging.getLogger(__name__)


class UnionArea:
    """Covered area of axis-aligned rectangles by the union of boxes inside a ``width x height`` image.

    Args:
        boxes: ``[N, 4]`` xyxy boxes; they are clipped to the image and empty ones are ignored.
        width: Image width in pixels.
        height: Image height in pixels.
    """

    def __init__(self, boxes, width: float, height: float) -> None:
        if not (width > 0 and height > 0):
            raise ValueError(f"image size must be positive, got {width}x{height}")
        b, _ = B.sanitize(boxes, width, height, min_size=0.0)
        b = b[B.area(b) > 0].astype(np.float64)
        self.num_boxes = len(b)
        self.xs = np.unique(np.concatenate([[0.0, float(width)], b[:, 0], b[:, 2]]))
        self.ys = np.unique(np.concatenate([[0.0, float(height)], b[:, 1], b[:, 3]]))
        inside = np.zeros((len(self.ys) - 1, len(self.xs) - 1), dtype=bool)
        ix1, ix2 = np.searchsorted(self.xs, b[:, 0]), np.searchsorted(self.xs, b[:, 2])
        iy1, iy2 = np.searchsorted(self.ys, b[:, 1]), np.searchsorted(self.ys, b[:, 3])
        for x1, y1, x2, y2 in zip(ix1, iy1, ix2, iy2, strict=True):
            inside[y1:y2, x1:x2] = True
        cell_area = np.outer(np.diff(self.ys), np.diff(self.xs)) * inside
        # table[j, i] = covered area of [0, xs[i]] x [0, ys[j]].
        self.table = np.zeros((len(self.ys), len(self.xs)))
        self.table[1:, 1:] = cell_area.cumsum(0).cumsum(1)

    @property
    def total(self) -> float:
        """Area of the union of the boxes."""
        return float(self.table[-1, -1])

    def _cumulative(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        xs, ys, t = self.xs, self.ys, self.table
        x = np.clip(x, xs[0], xs[-1])
        y = np.clip(y, ys[0], ys[-1])
        i = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, len(xs) - 2)
        j = np.clip(np.searchsorted(ys, y, side="right") - 1, 0, len(ys) - 2)
        tx = (x - xs[i]) / (xs[i + 1] - xs[i])
        ty = (y - ys[j]) / (ys[j + 1] - ys[j])
        top = (1 - tx) * t[j, i] + tx * t[j, i + 1]
        bottom = (1 - tx) * t[j + 1, i] + tx * t[j + 1, i + 1]
        return (1 - ty) * top + ty * bottom

    def covered(self, rects) -> np.ndarray:
        """Area of each xyxy rectangle (``[M, 4]``) that lies inside the union, float64 ``[M]``."""
        r = B.as_boxes(rects).astype(np.float64)
        x1, y1, x2, y2 = r.T
        c = self._cumulative
        out = c(x2, y2) - c(x1, y2) - c(x2, y1) + c(x1, y1)
        return np.clip(out, 0.0, None)


def intersections(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection boxes and areas of view pairs.

    Args:
        crops: ``[P, 2, 4]`` xyxy crop boxes of ``P`` view pairs.

    Returns:
        Float64 ``[P, 4]`` intersection boxes and their ``[P]`` areas (0 where the crops are disjoint).
    """
    c = np.asarray(crops, dtype=np.float64).reshape(-1, 2, 4)
    lt = np.maximum(c[:, 0, :2], c[:, 1, :2])
    rb = np.minimum(c[:, 0, 2:], c[:, 1, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    return np.concatenate([lt, rb], axis=1), wh[:, 0] * wh[:, 1]


@dataclass
class CoverageResult:
    """Coverage of one policy on one dataset.

    Attributes:
        policy: Policy name.
        mean_gt_fraction: Mean over all non-empty pairs of the GT-covered share of the intersection of
            the two crops (pairs pooled over images, so every pair weighs the same).
        ci95: 95% percentile bootstrap interval of that mean, resampling images (all pairs of an image
            go together, since they share the image's layout). NaN when ``bootstrap`` was 0.
        pairs: Pairs with a non-empty intersection, the ones averaged.
        skipped_empty: Pairs whose crops did not intersect, excluded from the mean.
        fallbacks: Pairs where the policy had no usable proposal and fell back to scene-scene.
        images: Images sampled (the ones with at least one GT box).
        images_without_gt: Images skipped because they have no GT box: without annotations the
            share is unknown rather than 0 (an unannotated image is not an object-free one).
        pairs_per_image: Pairs sampled per image.
        seed: Seed of the pair sampling and of the bootstrap.
        fractions: Float32 GT share of every averaged pair.
        image_index: Int64 record index of the image of every averaged pair.
    """

    policy: str
    mean_gt_fraction: float
    ci95: tuple[float, float]
    pairs: int
    skipped_empty: int
    fallbacks: int
    images: int
    images_without_gt: int
    pairs_per_image: int
    seed: int
    fractions: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))
    image_index: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))

    def to_dict(self) -> dict:
        """JSON-ready summary (NaN becomes ``None``); leaves out the per-pair arrays."""

        def num(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {
            "policy": self.policy,
            "mean_gt_fraction": num(self.mean_gt_fraction),
            "ci95": [num(self.ci95[0]), num(self.ci95[1])],
            "pairs": self.pairs,
            "skipped_empty": self.skipped_empty,
            "fallbacks": self.fallbacks,
            "images": self.images,
            "images_without_gt": self.images_without_gt,
            "pairs_per_image": self.pairs_per_image,
            "seed": self.seed,
        }


def _bootstrap_ci(
    sums: np.ndarray, counts: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile 95% interval of ``sum(sums) / sum(counts)`` under resampling of images."""
    n = len(sums)
    if resamples <= 0 or counts.sum() == 0:
        return (math.nan, math.nan)
    stats = np.empty(resamples)
    chunk = max(1, (1 << 22) // n)  # bounds the index matrix to ~32 MB
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        num, den = sums[idx].sum(1), counts[idx].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[start:stop] = num / den
    stats = stats[np.isfinite(stats)]  # a resample of only all-empty images has no mean
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return (float(lo), float(hi))


def coverage(
    records,
    store,
    policy: ViewPairPolicy,
    pairs_per_image: int = 50,
    seed: int = 0,
    bootstrap: int = 1000,
    progress: bool = False,
) -> CoverageResult:
    """Samples view pairs with ``policy`` exactly as training does and measures how much of their
    overlap is ground-truth object.

    Args:
        records: The dataset (:class:`~objcrop.data.records.Records`); its boxes are the ground truth.
        store: Proposals given to the policy, anything with ``boxes_of(i)`` (best first).
        policy: The view-pair policy.
        pairs_per_image: View pairs sampled per image.
        seed: Seeds the pair sampling and, independently, the bootstrap.
        bootstrap: Bootstrap resamples for the confidence interval (0: no interval).
        progress: Show a progress bar.

    Returns:
        A :class:`CoverageResult`.
    """
    if pairs_per_image < 1:
        raise ValueError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
    if hasattr(policy, "calibrate"):  # the paper's S_min, resolved as training resolves it
        policy.calibrate(records.size, store.boxes_of, len(records))
    sample_seq, boot_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(sample_seq)
    fractions, image_index, sums, counts = [], [], [], []
    skipped_empty = fallbacks = without_gt = 0
    start = time.perf_counter()
    for i in tqdm(range(len(records)), desc=f"coverage {policy.name}", unit="img", disable=not progress):
        width, height = records.size(i)
        union = UnionArea(records.boxes_of(i), width, height)
        if union.num_boxes == 0:
            without_gt += 1
            continue
        proposals = store.boxes_of(i)
        crops = np.empty((pairs_per_image, 2, 4), dtype=np.float32)
        for p in range(pairs_per_image):
            pair = policy.sample(width, height, proposals, rng)
            crops[p] = pair.crops
            fallbacks += pair.fallback
        boxes, areas = intersections(crops)
        nonempty = areas > 0
        skipped_empty += int((~nonempty).sum())
        frac = np.clip(union.covered(boxes[nonempty]) / areas[nonempty], 0.0, 1.0)
        fractions.append(frac.astype(np.float32))
        image_index.append(np.full(len(frac), i, dtype=np.int64))
        sums.append(frac.sum())
        counts.append(len(frac))
    elapsed = time.perf_counter() - start
    sums_a, counts_a = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.int64)
    fractions_a = np.concatenate(fractions) if fractions else np.zeros(0, np.float32)
    sampled = len(counts_a) * pairs_per_image
    log.info(
        "coverage %s: %d pairs on %d images in %.2f s (%.0f pairs/s)",
        policy.name,
        sampled,
        len(counts_a),
        elapsed,
        sampled / max(elapsed, 1e-9),
    )
    mean = float(fractions_a.astype(np.float64).mean()) if len(fractions_a) else math.nan
    return CoverageResult(
        policy=policy.name,
        mean_gt_fraction=mean,
        ci95=_bootstrap_ci(sums_a, counts_a, bootstrap, np.random.default_rng(boot_seq)),
        pairs=int(counts_a.sum()),
        skipped_empty=skipped_empty,
        fallbacks=int(fallbacks),
        images=len(counts_a),
        images_without_gt=without_gt,
        pairs_per_image=pairs_per_image,
        seed=seed,
        fractions=fractions_a,
        image_index=np.concatenate(image_index) if image_index else np.zeros(0, np.int64),
    )


def coverage_table(results: list[CoverageResult]) -> str:
    """A plain-text table of coverage results, one policy per row."""
    header = ("policy", "GT fraction", "95% CI", "pairs", "empty", "fallbacks", "images", "no GT")
    rows = [header]
    for r in results:
        rows.append(
            (
                r.policy,
                f"{r.mean_gt_fraction:.3f}",
                f"[{r.ci95[0]:.3f}, {r.ci95[1]:.3f}]",
                str(r.pairs),
                str(r.skipped_empty),
                str(r.fallbacks),
                str(r.images),
                str(r.images_without_gt),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
