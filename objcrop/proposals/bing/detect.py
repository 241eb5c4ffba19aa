"""BING detection: score every window of every size, keep local maxima, take the best by calibrated score."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from os import PathLike

import numpy as np

from objcrop.proposals.bing import _kernels
from objcrop.proposals.bing.features import ResizedImage, ResizePlan, as_rgb, window_layout
from objcrop.proposals.bing.model import BingModel

__all__ = ["Candidates", "score_candidates", "select", "detect", "BingProposer"]


@dataclass(frozen=True)
class Candidates:
    """Scored windows of one image before the final selection.

    Attributes:
        size_id: Int32 ``[n]`` row of ``model.sizes``.
        position: Int32 ``[n]`` flat index in the response map of that size.
        score: Float32 ``[n]`` calibrated score.
        filter_index: Int32 ``[n]`` filter (colour space) that scored the window.
        raw: Float32 ``[n]`` filter response before calibration.
    """

    size_id: np.ndarray
    position: np.ndarray
    score: np.ndarray
    filter_index: np.ndarray
    raw: np.ndarray


class _Workspace(threading.local):
    """Scratch arrays reused from image to image (one set per thread).

    Fresh memory costs a page fault per 4 KiB page on first touch, which on some machines (VMs) costs more
    than scoring the page's windows, so the large per-image buffers are kept between calls.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = np.empty(max(int(size * 1.25), 1024), dtype=dtype)
            self.buffers[name] = buf
        return buf[:size]


_WORK = _Workspace()


class _ImageGeometry:
    """Response-map sizes of all model sizes on one image size (indexed by size id; 0 where a size is skipped)."""

    def __init__(self, model: BingModel, width: int, height: int) -> None:
        layout = window_layout(width, height, model.sizes)
        self.layout = layout
        n = len(model.sizes)
        self.slot = np.full(n, -1, dtype=np.int64)
        self.slot[layout.index] = np.arange(len(layout.index))
        self.res_w = np.zeros(n, dtype=np.int64)
        self.res_h = np.zeros(n, dtype=np.int64)
        self.res_w[layout.index] = layout.res_w
        self.res_h[layout.index] = layout.res_h

    def boxes(self, size_id: np.ndarray, position: np.ndarray) -> np.ndarray:
        return self.layout.boxes(self.slot[size_id], position)


@dataclass(frozen=True)
class _FilterPlan:
    """What :func:`_kernels.score_windows` needs for one filter on one image size, beside the pixels."""

    index: int
    map_offsets: np.ndarray
    map_h: np.ndarray
    map_w: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    size_ids: np.ndarray
    workspace: tuple[tuple[int, int, int], tuple[int, int, int]]  # (capacity, map, pad) for local maxima / all


@dataclass(frozen=True)
class _Plan:
    """Everything about one image size that does not depend on the pixels, computed once per model and size."""

    geometry: _ImageGeometry
    colour_spaces: tuple[tuple[ResizePlan, tuple[_FilterPlan, ...]], ...]


def _plan(model: BingModel, width: int, height: int) -> _Plan:
    key = (width, height)
    plan = model.plans.get(key)
    if plan is not None:
        return plan
    geometry = _ImageGeometry(model, width, height)
    spaces = []
    for space in dict.fromkeys(model.colour_spaces):
        # Filters of one colour space (e.g. one per size group) share the resized images.
        members = [fi for fi, f in enumerate(model.filters) if f.colour_space == space]
        slot_of = [geometry.slot[model.size_ids(fi)] for fi in members]
        used = np.unique(np.concatenate(slot_of))
        used = used[used >= 0]
        if len(used) == 0:
            continue
        layout = geometry.layout.subset(used)
        resize = ResizePlan.make(layout, space, model.resize)
        filters = []
        for fi, slots in zip(members, slot_of, strict=True):
            own = np.flatnonzero(slots >= 0)  # rows of the filter's sizes that apply to this image
            if len(own) == 0:
                continue
            local = np.searchsorted(used, slots[own])
            cal = model.filters[fi].calibration[own]
            map_h, map_w = layout.map_h[local], layout.map_w[local]
            filters.append(
                _FilterPlan(
                    fi,
                    resize.offsets[local],
                    map_h,
                    map_w,
                    np.ascontiguousarray(cal[:, 0]),
                    np.ascontiguousarray(cal[:, 1]),
                    layout.index[local].astype(np.int32),
                    (_kernels.workspace_sizes(map_h, map_w, False), _kernels.workspace_sizes(map_h, map_w, True)),
                )
            )
        spaces.append((resize, tuple(filters)))
    plan = _Plan(geometry, tuple(spaces))
    if len(model.plans) >= _PLANS_PER_MODEL:
        model.plans.clear()
    model.plans[key] = plan
    return plan


_PLANS_PER_MODEL = 64


def score_candidates(
    model: BingModel, image: np.ndarray, *, binarized: bool = True, all_positions: bool = False
) -> tuple[Candidates, _ImageGeometry]:
    """Scores all windows of ``image`` with every filter and keeps the 3x3 local maxima of each response map
    (every window when ``all_positions``)."""
    rgb = as_rgb(image)
    height, width = rgb.shape[:2]
    plan = _plan(model, width, height)
    parts = []
    for resize, filters in plan.colour_spaces:
        buffer = _WORK.get("pixels", resize.total, np.uint8)
        resized = ResizedImage.build(rgb, resize.colour_space, resize.layout, buffer, plan=resize)
        for fp in filters:
            parts.append(_score_filter(model, fp, resized, binarized, all_positions))
    if not parts:
        empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return Candidates(empty_i, empty_i, empty_f, empty_i, empty_f), plan.geometry
    if len(parts) == 1:
        return Candidates(*parts[0]), plan.geometry
    cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
    return Candidates(*cols), plan.geometry


def _score_filter(
    model: BingModel, fp: _FilterPlan, resized: ResizedImage, binarized: bool, all_positions: bool
) -> tuple[np.ndarray, ...]:
    """Candidates of one filter."""
    cap, biggest_map, biggest_pad = fp.workspace[1 if all_positions else 0]
    ids = _WORK.get("ids", cap, np.int32)
    pos = _WORK.get("pos", cap, np.int32)
    val = _WORK.get("val", cap, np.float32)
    raw = _WORK.get("raw", cap, np.float32)
    bases, coeffs = model.binarized[fp.index]
    k = _kernels.score_windows(
        resized.pixels,
        fp.map_offsets,
        fp.map_h,
        fp.map_w,
        resized.channels,
        resized.summed,
        bases,
        coeffs,
        model.num_bits,
        model.filters[fp.index].weights,
        binarized,
        fp.slope,
        fp.intercept,
        fp.size_ids,
        all_positions,
        _WORK.get("mag", biggest_map, np.uint8),
        _WORK.get("res", biggest_map, np.float32),
        _WORK.get("hmax", biggest_pad, np.float32),
        ids,
        pos,
        val,
        raw,
    )
    # Copies: the workspace is overwritten by the next filter or image.
    return ids[:k].copy(), pos[:k].copy(), val[:k].copy(), np.full(k, fp.index, dtype=np.int32), raw[:k].copy()


def select(cand: Candidates, geometry: _ImageGeometry, topk: int, nss: int, per_size: int = 0) -> np.ndarray:
    """Indices of the windows kept by greedy per-size suppression, best calibrated score first."""
    taken = _WORK.get("taken", int((geometry.res_h * geometry.res_w).sum()), np.uint8)
    return _kernels.select_windows(
        cand.size_id, cand.position, cand.score, geometry.res_h, geometry.res_w, int(topk), nss, int(per_size), taken
    )


def detect(
    model: BingModel,
    image: np.ndarray,
    topk: int = 1000,
    *,
    binarized: bool = True,
    per_size: int = 0,
    all_positions: bool = False,
    rescore: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Object proposals of one image.

    Args:
        model: The BING model.
        image: Uint8 ``HxWx3`` RGB (a grayscale ``HxW`` image is replicated).
        topk: Most windows returned.
        binarized: Score with the binarized filter and bit planes (fast, the paper's detector); False uses
            the exact float filter.
        per_size: Most windows per window size (0: no limit).
        all_positions: Consider every window instead of the 3x3 local maxima of each response map.
        rescore: Rerank with the model's rescorer, if it has one (its scores are then its log-odds).

    Returns:
        ``boxes`` float32 ``[n, 4]`` xyxy pixels and ``scores`` float32 ``[n]``, best first.
    """
    rescorer = model.rescorer if rescore else None
    cand, geometry = score_candidates(model, image, binarized=binarized, all_positions=all_positions)
    chosen = select(cand, geometry, topk if rescorer is None else max(topk, rescorer.pool), model.nss, per_size)
    boxes = geometry.boxes(cand.size_id[chosen], cand.position[chosen])
    scores = cand.score[chosen].astype(np.float32)
    if rescorer is None:
        return boxes, scores
    return rescorer.rerank(as_rgb(image), boxes, scores, topk)


class BingProposer:
    """A proposal backend: ``proposer(image) -> (boxes, scores)``, best first.

    Args:
        model: A :class:`BingModel`, a model file saved by :func:`save_model` (``.npz``), or a folder with
            OpenCV's ``ObjNessB2W8{MAXBGR,HSV,I}.*.yml.gz`` files.
        topk: Most windows per image.
        binarized: Use the binarized detector (default) or the exact float filter.
        per_size: Most windows per window size (0: no limit).
        rescore: Rerank with the model's rescorer when it has one.
    """

    def __init__(
        self,
        model: BingModel | str | PathLike,
        topk: int = 1000,
        *,
        binarized: bool = True,
        per_size: int = 0,
        rescore: bool = True,
    ) -> None:
        if not isinstance(model, BingModel):
            from objcrop.proposals.bing.model_io import load_any

            model = load_any(model)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.model = model
        self.topk = int(topk)
        self.binarized = bool(binarized)
        self.per_size = int(per_size)
        self.rescore = bool(rescore)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes float32 [n, 4] xyxy, scores float32 [n])`` of an HxWx3 uint8 RGB image, best first."""
        return detect(
            self.model, image, self.topk, binarized=self.binarized, per_size=self.per_size, rescore=self.rescore
        )

    def __repr__(self) -> str:
        spaces = ",".join(self.model.colour_spaces)
        return f"BingProposer(colour_spaces={spaces}, topk={self.topk}, binarized={self.binarized})"
