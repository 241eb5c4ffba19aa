"""Proposal recall: how many ground-truth objects the top ``k`` proposals of a store find.

A GT box is *recalled at k* when one of the first ``k`` proposals of its image overlaps it with
IoU >= the threshold; recall is recalled boxes / all GT boxes, pooled over the dataset (the BING
paper's detection rate, DR). For every GT box we record the first rank at which a proposal covers
it, so one pass over the images gives the recall at every ``k`` (the DR-#WIN curve).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from objcrop import boxes as B

__all__ = ["RecallResult", "first_hit_ranks", "recall_at_k", "recall_table", "plot_recall_curves"]

log = logging.getLogger(__name__)

NEVER = np.iinfo(np.int64).max  # first-hit rank of a GT box that no proposal covers


def _iou_key(iou: float) -> str:
    return f"{iou:g}"


def first_hit_ranks(gt, proposals, ious: Sequence[float]) -> np.ndarray:
    """0-based rank of the first proposal that covers each GT box, per IoU threshold.

    Args:
        gt: ``[G, 4]`` xyxy ground-truth boxes.
        proposals: ``[P, 4]`` xyxy proposals, best first.
        ious: IoU thresholds; a proposal covers a box when their IoU >= the threshold (compared in
            float32, the precision of :func:`objcrop.boxes.iou`, so that an IoU of exactly 0.7 counts).

    Returns:
        Int64 ``[len(ious), G]``; :data:`NEVER` where no proposal covers the box.
    """
    gt, proposals = B.as_boxes(gt), B.as_boxes(proposals)
    out = np.full((len(ious), len(gt)), NEVER, dtype=np.int64)
    if len(gt) == 0 or len(proposals) == 0:
        return out
    overlap = B.iou(gt, proposals)
    for t, thr in enumerate(ious):
        hit = overlap >= np.float32(thr)
        covered = hit.any(axis=1)
        out[t, covered] = hit[covered].argmax(axis=1)
    return out


@dataclass
class RecallResult:
    """Recall of one proposal store on one dataset.

    Attributes:
        ks: Proposal budgets reported by :meth:`to_dict`.
        ious: IoU thresholds.
        num_gt: GT boxes counted (the recall denominator).
        images: Images evaluated.
        proposals_per_image: Mean number of proposals per image (over all images).
        max_proposals: Largest number of proposals of any image: the length of the curves.
        first_rank: Int64 ``[len(ious), num_gt]`` 0-based rank of the first covering proposal of every
            GT box (:data:`NEVER` if none), GT boxes in dataset order.
    """

    ks: tuple[int, ...]
    ious: tuple[float, ...]
    num_gt: int
    images: int
    proposals_per_image: float
    max_proposals: int
    first_rank: np.ndarray = field(repr=False)

    def curve(self, iou: float) -> np.ndarray:
        """Float64 ``[max_proposals]``: entry ``k - 1`` is the recall with the top ``k`` proposals."""
        ranks = self.first_rank[self._iou_index(iou)]
        hits = np.bincount(ranks[ranks < self.max_proposals], minlength=self.max_proposals)
        return np.cumsum(hits) / max(self.num_gt, 1)

    def at(self, k: int, iou: float) -> float:
        """Recall with the top ``k`` proposals of every image (all of them when an image has fewer)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        ranks = self.first_rank[self._iou_index(iou)]
        return float((ranks < k).sum() / max(self.num_gt, 1))

    def to_dict(self) -> dict:
        """``{"recall": {iou: {k: recall}}, "proposals_per_image": n}``, keys as strings ("0.5", "10")."""
        return {
            "recall": {_iou_key(t): {str(k): self.at(k, t) for k in self.ks} for t in self.ious},
            "proposals_per_image": float(self.proposals_per_image),
        }

    def _iou_index(self, iou: float) -> int:
        for i, t in enumerate(self.ious):
            if np.isclose(t, iou):
                return i
        raise ValueError(f"IoU {iou} not evaluated; available: {list(self.ious)}")


def recall_at_k(
    records,
    store,
    ks: Sequence[int] = (1, 10, 100, 1000),
    ious: Sequence[float] = (0.5, 0.7),
    progress: bool = False,
) -> RecallResult:
    """Measures how many GT boxes the best ``k`` proposals of each image recall.

    Args:
        records: The dataset (:class:`~objcrop.data.records.Records`); ``boxes_of(i)`` are the GT boxes
            (readers leave crowd boxes out).
        store: Proposals aligned with ``records``: anything with ``boxes_of(i)`` returning image ``i``'s
            proposals best first (a proposal store opened for these records).
        ks: Proposal budgets to report.
        ious: IoU thresholds.
        progress: Show a progress bar.

    Returns:
        A :class:`RecallResult`.
    """
    ks = tuple(int(k) for k in ks)
    ious = tuple(float(t) for t in ious)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not ious or not all(0.0 < t <= 1.0 for t in ious):
        raise ValueError(f"IoU thresholds must lie in (0, 1], got {ious}")
    if hasattr(store, "__len__") and len(store) != len(records):
        raise ValueError(f"the store has {len(store)} images but the dataset {len(records)}")
    ranks, counts = [], np.zeros(len(records), dtype=np.int64)
    start = time.perf_counter()
    for i in tqdm(range(len(records)), desc="recall", unit="img", disable=not progress):
        proposals = B.as_boxes(store.boxes_of(i))
        counts[i] = len(proposals)
        ranks.append(first_hit_ranks(records.boxes_of(i), proposals, ious))
    elapsed = time.perf_counter() - start
    first_rank = np.concatenate(ranks, axis=1) if ranks else np.zeros((len(ious), 0), np.int64)
    log.info("recall: %d images in %.2f s (%.0f img/s)", len(records), elapsed, len(records) / max(elapsed, 1e-9))
    return RecallResult(
        ks=ks,
        ious=ious,
        num_gt=first_rank.shape[1],
        images=len(records),
        proposals_per_image=float(counts.mean()) if len(counts) else 0.0,
        max_proposals=int(counts.max()) if len(counts) else 0,
        first_rank=first_rank,
    )


def recall_table(results: Mapping[str, RecallResult]) -> str:
    """A plain-text table, one row per store and IoU threshold, one column per ``k``."""
    ks = sorted({k for r in results.values() for k in r.ks})
    header = ("proposals", "IoU", *(f"R@{k}" for k in ks), "per image")
    rows = [header]
    for name, r in results.items():
        for t in r.ious:
            rows.append(
                (name, _iou_key(t), *(f"{r.at(k, t):.3f}" for k in ks), f"{r.proposals_per_image:.0f}"),
            )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_recall_curves(results: Mapping[str, RecallResult], out_png, iou: float = 0.5, check: bool = True) -> Path:
    """Draws the DR-#WIN plot of the BING paper: recall against proposals per image (log x), one line
    per store, and writes it as a PNG atomically.

    Args:
        results: Store name -> its :class:`RecallResult`; each must have been evaluated at ``iou``.
        out_png: Output path.
        iou: IoU threshold to plot.
        check: Refuse to replace a file at ``out_png`` that objcrop did not write (see
            :func:`~objcrop.analysis.pictures.save_figure`).

    Returns:
        The path written.
    """
    from objcrop.analysis.pictures import save_figure

    if not results:
        raise ValueError("no recall results to plot")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name, r in results.items():
        curve = r.curve(iou)
        if len(curve) == 0:
            log.warning("recall plot: %s has no proposals; drawn as a point at 0", name)
            curve = np.zeros(1)
        ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{name} (all: {curve[-1]:.2f})")
    ax.set_xscale("log")
    ax.set_xlim(left=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("#WIN (proposals per image)")
    ax.set_ylabel(f"DR (recall at IoU {_iou_key(iou)})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out_png, check=check)
