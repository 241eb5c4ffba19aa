"""BING detection: score every window of every size, keep local maxima, take the best by calibrated score."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from os import PathLike

import numpy as np

from objcrop.proposals.bing import _kernels
from objcrop.proposals.bing.features import WINDOW, ResizedImage, ResizePlan, as_rgb, window_layout
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
        # OpenCV's boxes: each size's own sides, clipped to the image (None: scaled from the resized maps).
        self.nominal = np.minimum(model.sizes, [width, height]).astype(np.int64) if model.boxes == "nominal" else None

    def boxes(self, size_id: np.ndarray, position: np.ndarray) -> np.ndarray:
        if self.nominal is None:
            return self.layout.boxes(self.slot[size_id], position)
        size_id = np.asarray(size_id, dtype=np.int64)
        position = np.asarray(position, dtype=np.int64)
        side = self.nominal[size_id]
        rw = self.res_w[size_id]
        # A clipped side is the image's, whose map has one position, so the step side // 8 is exact where it counts.
        x1 = position % rw * (side[:, 0] // WINDOW)
        y1 = position // rw * (side[:, 1] // WINDOW)
        x2 = np.minimum(x1 + side[:, 0], self.layout.width)
        y2 = np.minimum(y1 + side[:, 1], self.layout.height)
        return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


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


def select(
    cand: Candidates,
    geometry: _ImageGeometry,
    topk: int,
    nss: int,
    per_size: int = 0,
    falling: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the windows kept by greedy per-size suppression, best calibrated score first.

    Suppression runs in the order of the filter response, as in the paper and OpenCV; that is the order of
    the calibrated score unless a size's calibration slope is not positive (``falling``: bool
    ``[filters, sizes]``, see :meth:`BingModel.falling_slopes`). The windows of such sizes are suppressed apart,
    by response, and merged by calibrated score (suppression never crosses sizes, so the result is the same).
    """
    taken = _WORK.get("taken", int((geometry.res_h * geometry.res_w).sum()), np.uint8)

    def run(idx: np.ndarray, key: np.ndarray, k: int) -> np.ndarray:
        args = (cand.size_id[idx], cand.position[idx], key[idx], geometry.res_h, geometry.res_w)
        return idx[_kernels.select_windows(*args, int(k), nss, int(per_size), taken)]

    mask = None if falling is None or not falling.any() else falling[cand.filter_index, cand.size_id]
    if mask is None or not mask.any():  # the usual case: no copies of the candidate arrays
        args = (cand.size_id, cand.position, cand.score, geometry.res_h, geometry.res_w)
        return _kernels.select_windows(*args, int(topk), nss, int(per_size), taken)
    rising = run(np.flatnonzero(~mask), cand.score, topk)
    # Their best responses may score worst, so only the per-size limit bounds how many can reach the merge.
    falling_idx = np.flatnonzero(mask)
    bound = per_size * len(np.unique(cand.size_id[falling_idx])) if per_size > 0 else len(falling_idx)
    by_response = run(falling_idx, cand.raw, bound)
    merged = np.concatenate([rising, by_response])
    return merged[np.argsort(-cand.score[merged], kind="stable")[:topk]]


def detect(
    model: BingModel,
    image: np.ndarray,
    topk: int = 1000,
    *,
    binarized: bool = True,
    per_size: int | None = None,
    all_positions: bool | None = None,
    rescore: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Object proposals of one image.

    Args:
        model: The BING model.
        image: Uint8 ``HxWx3`` RGB (a grayscale ``HxW`` image is replicated).
        topk: Most windows returned.
        binarized: Score with the binarized filter and bit planes (fast, the paper's detector); False uses
            the exact float filter.
        per_size: Most windows per window size (0: no limit; None: the model's).
        all_positions: Consider every window instead of the 3x3 local maxima of each response map (None: the
            model's).
        rescore: Rerank with the model's rescorer, if it has one (its scores are then its log-odds).

    Returns:
        ``boxes`` float32 ``[n, 4]`` xyxy pixels and ``scores`` float32 ``[n]``, best first.
    """
    rescorer = model.rescorer if rescore else None
    per_size = model.per_size if per_size is None else per_size
    all_positions = model.all_positions if all_positions is None else all_positions
    cand, geometry = score_candidates(model, image, binarized=binarized, all_positions=all_positions)
    pool = topk if rescorer is None else max(topk, rescorer.pool)
    chosen = select(cand, geometry, pool, model.nss, per_size, model.falling_slopes)
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
        per_size: Most windows per window size (0: no limit; None: the model's).
        rescore: Rerank with the model's rescorer when it has one.
    """

    def __init__(
        self,
        model: BingModel | str | PathLike,
        topk: int = 1000,
        *,
        binarized: bool = True,
        per_size: int | None = None,
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
        self.per_size = None if per_size is None else int(per_size)
        self.rescore = bool(rescore)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes float32 [n, 4] xyxy, scores float32 [n])`` of an HxWx3 uint8 RGB image, best first."""
        return detect(
            self.model, image, self.topk, binarized=self.binarized, per_size=self.per_size, rescore=self.rescore
        )

    def __repr__(self) -> str:
        spaces = ",".join(self.model.colour_spaces)
        return f"BingProposer(colour_spaces={spaces}, topk={self.topk}, binarized={self.binarized})"
