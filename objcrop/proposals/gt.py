"""Ground-truth boxes as proposals (the upper bound of the paper's proposal ablations).

GT proposals come from the annotations, not from pixels, so they need no store: ``--proposals gt``
builds them in memory (:meth:`ProposalStore.from_records`). ``objcrop propose --backend gt`` writes
the same boxes as a store folder, for tools that want one.
"""

from __future__ import annotations

import numpy as np

from objcrop import boxes as B

__all__ = ["gt_proposals", "order_largest_first"]


def order_largest_first(boxes: np.ndarray) -> np.ndarray:
    """Indices that sort ``boxes`` by decreasing area; equal areas keep annotation order."""
    return np.argsort(-B.area(boxes), kind="stable")


def gt_proposals(records, topk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image's GT boxes as proposals.

    Boxes are clipped to the image and unusable ones (non-finite, below 1 pixel, outside) are
    dropped, as for any backend. They come largest first with score 1.0, so that a policy's top-k
    keeps the largest objects.

    Args:
        records: The dataset (:class:`objcrop.data.records.Records`).
        topk: Keep at most this many boxes per image (all when ``None``).

    Returns:
        ``(boxes float32 [N, 4], scores float32 [N], offsets int64 [images + 1])``.
    """
    kept = []
    for i in range(len(records)):
        width, height = records.size(i)
        boxes, _ = B.sanitize(records.boxes_of(i), width, height)
        kept.append(boxes[order_largest_first(boxes)][:topk])
    counts = [len(b) for b in kept]
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    boxes = np.concatenate(kept) if kept else np.zeros((0, 4), np.float32)
    return boxes.astype(np.float32), np.ones(len(boxes), dtype=np.float32), offsets
