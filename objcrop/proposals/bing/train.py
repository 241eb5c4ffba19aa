"""Training BING on any box-annotated dataset (Cheng et al., CVPR 2014, Sec. 3).

Stage I learns an 8x8 linear filter on normed gradients (one per colour space, or per colour space and size
group): positives are the ground-truth boxes seen at the quantized window sizes that still overlap them
(IoU >= 0.5), with their mirror images; negatives are random windows that overlap no box. Stage II runs the
stage-I detector on the training images and fits, for each window size, a logistic regression from filter
response to "this window covers an object", so that scores of different sizes (and colour spaces) become
comparable log-odds.

Both stages read features from the same resized gradient maps as detection (:mod:`.features`).

Cost is linear in the images and bounded in samples: the stage-I SVM is solved in the primal (a few passes over
the samples, instead of thousands for the dual), and every stage fits on a seeded uniform sample of at most
``TrainConfig.max_*`` samples (:mod:`.sampling`), so that COCO-scale datasets need no more memory or solver
time than a few thousand images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from objcrop import boxes as B
from objcrop import parallel
from objcrop.data.records import Records
from objcrop.proposals.bing import sampling
from objcrop.proposals.bing.detect import Candidates, detect, score_candidates, select
from objcrop.proposals.bing.features import (
    COLOUR_SPACES,
    WINDOW,
    ResizedImage,
    size_grid,
    window_layout,
)
from objcrop.proposals.bing.model import BingFilter, BingModel
from objcrop.proposals.bing.rescore import NUM_FEATURES, Rescorer, prior_boxes
from objcrop.proposals.bing.train_config import SVM_SOLVERS, TrainConfig

__all__ = ["SVM_SOLVERS", "TrainConfig", "train_bing", "size_counts", "load_rgb"]

log = logging.getLogger(__name__)


def load_rgb(path: str) -> np.ndarray:
    """Decodes an image as uint8 HxWx3 RGB (EXIF orientation applied)."""
    from objcrop.data.images import load_image

    return np.asarray(load_image(path).convert("RGB"))


def _centred_windows(gt: np.ndarray, layout, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every GT box and size slot, the window of that size whose centre is nearest the box centre.

    Returns ``slot [G, S]``, ``position [G, S]`` (flat index in the response map) and ``iou [G, S]``.
    """
    n_slots = len(layout.index)
    slots = np.broadcast_to(np.arange(n_slots), (len(gt), n_slots))
    sx = layout.width / layout.map_w
    sy = layout.height / layout.map_h
    cx = (gt[:, 0] + gt[:, 2]) / 2
    cy = (gt[:, 1] + gt[:, 3]) / 2
    px = np.clip(np.rint(cx[:, None] / sx[None] - WINDOW / 2), 0, layout.res_w[None] - 1).astype(np.int64)
    py = np.clip(np.rint(cy[:, None] / sy[None] - WINDOW / 2), 0, layout.res_h[None] - 1).astype(np.int64)
    position = py * layout.res_w[None] + px
    boxes = layout.boxes(slots.ravel(), position.ravel()).reshape(len(gt), n_slots, 4)
    ious = np.stack([B.iou(gt[g : g + 1], boxes[g])[0] for g in range(len(gt))]) if len(gt) else np.zeros((0, n_slots))
    return slots, position, ious


def size_counts(records: Records, sizes: np.ndarray, positive_iou: float = 0.5) -> np.ndarray:
    """How many GT boxes of ``records`` each window size can cover (IoU >= ``positive_iou`` with its
    nearest centred window); needs no pixels."""
    counts = np.zeros(len(sizes), dtype=np.int64)
    for i in range(len(records)):
        width, height = records.size(i)
        gt, _ = B.sanitize(records.boxes_of(i), width, height)
        if len(gt) == 0:
            continue
        layout = window_layout(width, height, sizes)
        if len(layout.index) == 0:
            continue
        _, _, ious = _centred_windows(gt, layout, sizes)
        np.add.at(counts, layout.index, (ious >= positive_iou).sum(axis=0))
    return counts


# ------------------------------------------------------------------ per-image work (runs in worker processes)


@dataclass(frozen=True)
class _Job:
    path: str
    width: int
    height: int
    gt: np.ndarray
    index: int


_WORKER: dict = {}
_MIN_GROUP_SAMPLES = 50


def _init(state: dict) -> None:
    _WORKER.clear()
    _WORKER.update(state)


def _read(job: _Job, load: Callable[[str], np.ndarray]) -> tuple[np.ndarray | None, str | None]:
    try:
        image = load(job.path)
    except (OSError, ValueError) as err:
        return None, f"{job.path}: {err}"
    if image.shape[1] != job.width or image.shape[0] != job.height:
        return None, f"{job.path}: decoded {image.shape[1]}x{image.shape[0]}, dataset says {job.width}x{job.height}"
    return image, None


def _stage1_samples(job: _Job) -> tuple:
    """Positive and negative 8x8 gradient patches of one image per colour space (at most ``_WORKER["negatives"]``
    negatives), the size (row of the size table) of each positive and each negative, and their sampling keys:
    ``(positives, negatives, pos_size, neg_size, pos_key, neg_key, error)``."""
    cfg: TrainConfig = _WORKER["config"]
    sizes: np.ndarray = _WORKER["sizes"]
    image, error = _read(job, _WORKER["load"])
    nothing = np.zeros(0, np.int64)
    if image is None:
        return [], [], nothing, nothing, np.zeros(0), np.zeros(0), error
    rng = np.random.default_rng([cfg.seed, job.index])
    layout = window_layout(job.width, job.height, sizes)
    if len(layout.index) == 0:
        return [], [], nothing, nothing, np.zeros(0), np.zeros(0), None
    # Geometry first, so that every colour space sees the same windows.
    pos_slot, pos_position = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(job.gt):
        slots, position, ious = _centred_windows(job.gt, layout, sizes)
        hit = ious >= cfg.positive_iou
        pos_slot, pos_position = slots[hit], position[hit]
    counts = layout.res_w.astype(np.int64) * layout.res_h
    budget = _WORKER["negatives"]
    neg_slot = rng.integers(0, len(counts), size=4 * budget)
    neg_position = (rng.random(len(neg_slot)) * counts[neg_slot]).astype(np.int64)
    if len(job.gt):
        overlap = B.iou(layout.boxes(neg_slot, neg_position), job.gt).max(axis=1)
        keep = overlap < cfg.positive_iou
        neg_slot, neg_position = neg_slot[keep], neg_position[keep]
    neg_slot, neg_position = neg_slot[:budget], neg_position[:budget]

    positives, negatives = [], []
    for space in _WORKER["colour_spaces"]:
        resized = ResizedImage.build(image, space, layout, mode=cfg.resize)
        maps = [resized.gradient(s) for s in range(len(layout.index))]
        positives.append(_patches(maps, layout, pos_slot, pos_position))
        negatives.append(_patches(maps, layout, neg_slot, neg_position))
    pos_key = np.random.default_rng([cfg.seed, job.index, 1]).random(len(pos_slot))
    neg_key = np.random.default_rng([cfg.seed, job.index, 4]).random(len(neg_slot))
    return positives, negatives, layout.index[pos_slot], layout.index[neg_slot], pos_key, neg_key, None


def _patches(maps: list[np.ndarray], layout, slot: np.ndarray, position: np.ndarray) -> np.ndarray:
    out = np.empty((len(slot), WINDOW, WINDOW), dtype=np.uint8)
    for k, (s, p) in enumerate(zip(slot.tolist(), position.tolist(), strict=True)):
        rw = int(layout.res_w[s])
        y, x = divmod(p, rw)
        out[k] = maps[s][y : y + WINDOW, x : x + WINDOW]
    return out


def _stage2_samples(job: _Job) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str | None]:
    """Detections of the stage-I model on one image: ``(filter index, size id, raw score, covers a GT box,
    sampling key)``."""
    cfg: TrainConfig = _WORKER["config"]
    model: BingModel = _WORKER["model"]
    image, error = _read(job, _WORKER["load"])
    empty = np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, bool)
    if image is None:
        return (*empty, np.zeros(0), error)
    cand, geometry = score_candidates(model, image, binarized=_WORKER["binarized"])
    outs = [[], [], [], []]
    for fi in range(len(model.filters)):
        mine = np.flatnonzero(cand.filter_index == fi)
        if len(mine) == 0:
            continue
        ids, pos, raw = cand.size_id[mine], cand.position[mine], cand.raw[mine]
        # Per size, the best windows by response (identity calibration), as detection would keep them.
        own = Candidates(ids, pos, raw, cand.filter_index[mine], raw)
        chosen = select(own, geometry, cfg.calibration_windows * len(np.unique(ids)), cfg.nss, cfg.calibration_windows)
        boxes = geometry.boxes(ids[chosen], pos[chosen])
        if len(job.gt):
            label = B.iou(boxes, job.gt).max(axis=1) >= cfg.positive_iou
        else:
            label = np.zeros(len(chosen), bool)
        outs[0].append(np.full(len(chosen), fi, np.int32))
        outs[1].append(ids[chosen])
        outs[2].append(raw[chosen])
        outs[3].append(label)
    columns = tuple(np.concatenate(o) for o in outs) if outs[0] else empty
    key = np.random.default_rng([cfg.seed, job.index, 2]).random(len(columns[0]))
    return (*columns, key, None)


def _rescore_samples(job: _Job) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None]:
    """Rescorer features of BING's best windows and the priors on one image, whether each covers a GT box, and
    their sampling keys."""
    model: BingModel = _WORKER["model"]
    rescorer: Rescorer = _WORKER["rescorer"]
    image, error = _read(job, _WORKER["load"])
    if image is None:
        return np.zeros((0, NUM_FEATURES), np.float32), np.zeros(0, bool), np.zeros(0), error
    boxes, scores = detect(model, image, rescorer.pool, rescore=False)
    boxes, features = rescorer.candidates(image, boxes, scores)
    cfg: TrainConfig = _WORKER["config"]
    label = B.iou(boxes, job.gt).max(axis=1) >= cfg.positive_iou if len(job.gt) else np.zeros(len(boxes), bool)
    return features, label, np.random.default_rng([cfg.seed, job.index, 3]).random(len(boxes)), None


def _fit_rescorer(model: BingModel, jobs: list[_Job], cfg: TrainConfig, workers: int, progress: bool, load):
    """The rescorer, fitted on at most ``cfg.max_rescore_windows`` windows, and how many it was fitted on."""
    from sklearn.linear_model import LogisticRegression

    relative = [j.gt / np.array([j.width, j.height, j.width, j.height], np.float32) for j in jobs]
    priors = prior_boxes(np.concatenate(relative), cfg.num_priors)
    zeros = np.zeros(NUM_FEATURES, np.float32)
    blank = Rescorer(cfg.rescore_pool, priors, zeros, np.ones(NUM_FEATURES, np.float32), zeros, 0.0)
    state = {"config": cfg, "model": model, "rescorer": blank, "load": load}
    reservoir = sampling.Reservoir(cfg.max_rescore_windows)

    def add(result) -> None:
        reservoir.add(np.zeros(len(result[2]), np.int64), result[2], x=result[0], y=result[1])

    _map(_rescore_samples, jobs, state, workers, "BING rescorer features", progress, each=add)
    _, kept = reservoir.result()
    x, y = kept["x"], kept["y"]
    if y.all() or not y.any():
        raise ValueError(f"the rescorer needs covering and non-covering windows, got {int(y.sum())} of {len(y)}")
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    lr = LogisticRegression(C=1.0, max_iter=3000)
    lr.fit((x - mean) / scale, y)
    log.info("BING rescorer: %d windows, %.2f%% cover an object", len(y), 100 * y.mean())
    return Rescorer(cfg.rescore_pool, priors, mean, scale, lr.coef_[0], float(lr.intercept_[0])), len(y)


def _map(fn, jobs: Sequence[_Job], state: dict, workers: int, desc: str, progress: bool, each=None):
    """``fn`` of every job, in job order; each result goes to ``each`` when given (and is not kept), so that a
    long run holds only what ``each`` keeps. Returns the kept results and how many images were skipped."""
    start = time.perf_counter()
    results, errors = [], []

    def take(stream) -> None:
        for r in tqdm(stream, total=len(jobs), desc=desc, unit="img", disable=not progress):
            if r[-1] is not None:
                errors.append(r[-1])
            if each is None:
                results.append(r)
            else:
                each(r)

    if workers <= 1:
        _init(state)
        take(fn(j) for j in jobs)
    else:
        take(parallel.imap(fn, jobs, workers, initializer=_init, initargs=(state,), chunksize=4))
    elapsed = time.perf_counter() - start
    for e in errors[:5]:
        log.warning("skipped %s", e)
    if errors:
        log.warning("%s: skipped %d of %d images that could not be read", desc, len(errors), len(jobs))
    log.info("%s: %d images in %.1f s (%.1f img/s)", desc, len(jobs), elapsed, len(jobs) / max(elapsed, 1e-9))
    return results, len(errors)


# ------------------------------------------------------------------ the two stages


def _fit_filter(pos: np.ndarray, neg: np.ndarray, c: float, seed: int, solver: str = "primal") -> np.ndarray:
    """The stage-I 8x8 filter: a linear SVM (squared hinge, L2) on positives, their mirror images and negatives.

    With 64 features and tens of thousands of samples or more the primal problem is the small one: liblinear's
    Newton method needs a few passes over the data (linear cost), while dual coordinate descent needs thousands
    (measured on 238 COCO images: 0.2 s against 77 s, same weights to a cosine of 0.9999999).
    """
    from sklearn.svm import LinearSVC

    flipped = pos[:, :, ::-1]  # mirror images are objects too (the paper's augmentation)
    x = np.concatenate([pos, flipped, neg]).reshape(-1, WINDOW * WINDOW).astype(np.float32) / 255.0
    y = np.concatenate([np.ones(2 * len(pos)), np.zeros(len(neg))])
    if solver == "dual":
        svm = LinearSVC(C=c, class_weight="balanced", dual=True, max_iter=20000, random_state=seed)
    else:
        svm = LinearSVC(C=c, class_weight="balanced", dual=False, random_state=seed)
    svm.fit(x, y)
    return (svm.coef_.reshape(WINDOW, WINDOW) / 255.0).astype(np.float32)


def _fit_calibration(raw: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """Logistic regression ``P(object | raw) = sigmoid(slope * raw + intercept)``; returns ``(slope, intercept)``."""
    from sklearn.linear_model import LogisticRegression

    n, n_pos = len(label), int(label.sum())
    if n_pos == 0 or n_pos == n:
        # One class only: a constant prior (add-one smoothed), no dependence on the response.
        p = (n_pos + 0.5) / (n + 1.0)
        return 0.0, float(np.log(p / (1 - p)))
    mu, sd = float(raw.mean()), float(raw.std()) or 1.0
    lr = LogisticRegression(C=1.0)
    lr.fit(((raw - mu) / sd)[:, None], label)
    slope = float(lr.coef_[0, 0]) / sd
    return slope, float(lr.intercept_[0]) - slope * mu


def train_bing(
    records: Records,
    colour_spaces: Sequence[str] = ("rgb",),
    config: TrainConfig | None = None,
    *,
    seed: int | None = None,
    workers: int = 1,
    progress: bool = True,
    load: Callable[[str], np.ndarray] = load_rgb,
    binarized: bool = True,
) -> BingModel:
    """Trains a BING model (both stages) on the boxes of ``records``.

    Args:
        records: Images with their GT boxes (images without boxes give negatives only).
        colour_spaces: One filter per colour space (``rgb``, ``hsv``, ``gray``); merged by calibrated score.
        config: Training parameters (defaults: :class:`TrainConfig`).
        seed: Overrides ``config.seed``.
        workers: Worker processes for the per-image work (``forkserver``: a script that trains with workers needs
            the ``if __name__ == "__main__":`` guard). The model does not depend on it.
        progress: Show progress bars and throughput.
        load: Image decoder, ``path -> HxWx3 uint8 RGB``.
        binarized: Calibrate on the binarized detector's scores (what detection uses by default).

    Raises:
        ValueError: No images, no usable boxes, no window size with enough boxes, or an unknown colour space.
    """
    cfg = config or TrainConfig()
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    colour_spaces = tuple(colour_spaces)
    if not colour_spaces or any(c not in COLOUR_SPACES for c in colour_spaces):
        raise ValueError(f"colour spaces must be a non-empty subset of {COLOUR_SPACES}, got {colour_spaces}")
    if len(records) == 0:
        raise ValueError("cannot train BING on an empty dataset")
    grid = size_grid(cfg.side_lengths)
    counts = size_counts(records, grid, cfg.positive_iou)
    if counts.sum() == 0:
        raise ValueError(f"no usable GT box in {len(records)} images (all empty, degenerate or outside the images)")
    active = counts >= cfg.min_boxes_per_size
    if not active.any():
        raise ValueError(
            f"no window size covers >= {cfg.min_boxes_per_size} GT boxes (best: {counts.max()}); "
            "lower min_boxes_per_size or add data"
        )
    sizes = grid[active]
    log.info("BING: %d of %d window sizes have >= %d boxes", len(sizes), len(grid), cfg.min_boxes_per_size)

    jobs = []
    for i in range(len(records)):
        width, height = records.size(i)
        gt, _ = B.sanitize(records.boxes_of(i), width, height)
        jobs.append(_Job(records.path(i), width, height, gt, i))
    # Memory and solver time stay bounded however many images there are: a budget of negatives per image, and
    # uniform samples of at most max_positives and max_negatives (the same windows in every colour space).
    budget = sampling.per_image_budget(cfg.negatives_per_image, cfg.max_negatives, len(jobs))
    state = {"config": cfg, "sizes": sizes, "colour_spaces": colour_spaces, "load": load, "negatives": budget}
    positives, negatives = sampling.Reservoir(cfg.max_positives), sampling.Reservoir(cfg.max_negatives)
    no_patches = np.zeros((0, WINDOW, WINDOW), np.uint8)

    def add(result) -> None:
        pos, neg, pos_size, neg_size, pos_key, neg_key, _ = result
        for reservoir, patches, size, key in ((positives, pos, pos_size, pos_key), (negatives, neg, neg_size, neg_key)):
            by_space = {f"c{c}": patches[c] if patches else no_patches for c in range(len(colour_spaces))}
            reservoir.add(np.zeros(len(size), np.int64), key, size=size, **by_space)

    _, skipped = _map(_stage1_samples, jobs, state, workers, "BING stage I features", progress, each=add)
    if skipped == len(jobs):
        raise ValueError(f"none of the {len(jobs)} training images could be read")

    # One stage-I filter per colour space and size group (the paper: a single group).
    group = np.searchsorted(np.asarray(cfg.size_groups, np.float64), np.sqrt(sizes.prod(axis=1)), side="right")
    _, pos_kept = positives.result()
    _, neg_kept = negatives.result()
    pos_size, neg_size = pos_kept["size"], neg_kept["size"]
    specs = []  # (colour space, rows of `sizes`, weights)
    for c, space in enumerate(colour_spaces):
        pos, neg = pos_kept[f"c{c}"], neg_kept[f"c{c}"]
        if len(pos) == 0 or len(neg) == 0:
            raise ValueError(f"stage I needs positives and negatives, got {len(pos)} and {len(neg)}")
        for g in np.unique(group).tolist():
            rows = np.flatnonzero(group == g)
            p_sel, n_sel = np.isin(pos_size, rows), np.isin(neg_size, rows)
            if p_sel.sum() < _MIN_GROUP_SAMPLES or n_sel.sum() < _MIN_GROUP_SAMPLES:
                p_sel, n_sel = slice(None), slice(None)  # too few to fit this group alone: learn from all sizes
            weights = _fit_filter(pos[p_sel], neg[n_sel], cfg.svm_c, cfg.seed, cfg.svm_solver)
            specs.append((space, rows, weights))
        log.info("BING stage I (%s): %d positives (+ mirrored), %d negatives", space, len(pos), len(neg))

    stage1 = BingModel(
        tuple(BingFilter(space, w, sizes[rows], np.tile([[1.0, 0.0]], (len(rows), 1))) for space, rows, w in specs),
        num_bases=cfg.num_bases,
        num_bits=cfg.num_bits,
        nss=cfg.nss,
        resize=cfg.resize,
    )
    # A uniform sample of at most max_calibration_windows per filter and size, kept while the images stream in.
    state = {"config": cfg, "model": stage1, "load": load, "binarized": binarized}
    reservoir = sampling.Reservoir(cfg.max_calibration_windows)

    def add(result) -> None:
        fi, size_id, raw, label, key, _ = result
        reservoir.add((fi.astype(np.int64) << 32) | size_id, key, raw=raw, label=label)

    _map(_stage2_samples, jobs, state, workers, "BING stage II windows", progress, each=add)
    group, kept = reservoir.result()
    raw, label = kept["raw"], kept["label"]

    filters = []
    for fi, (space, rows, w) in enumerate(specs):
        cal = np.zeros((len(rows), 2), np.float32)
        for s, size_id in enumerate(stage1.size_ids(fi).tolist()):
            sel = group == ((fi << 32) | size_id)
            cal[s] = _fit_calibration(raw[sel], label[sel]) if sel.any() else (0.0, -20.0)
        filters.append(BingFilter(space, w, sizes[rows], cal))
    info = {
        "trained_on": {"images": len(records), "boxes": int(sum(len(j.gt) for j in jobs)), "skipped": skipped},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "size_counts": {f"{w}x{h}": int(n) for (w, h), n in zip(grid.tolist(), counts.tolist(), strict=True)},
        "stage1_positives": int(len(pos_size)),
        "stage1_negatives": int(len(neg_size)),
        "stage2_windows": int(len(label)),
        "stage2_positive_rate": float(label.mean()) if len(label) else 0.0,
    }
    model = BingModel(
        tuple(filters), num_bases=cfg.num_bases, num_bits=cfg.num_bits, nss=cfg.nss, resize=cfg.resize, info=info
    )
    if cfg.rescore:
        rescorer, windows = _fit_rescorer(model, jobs, cfg, workers, progress, load)
        model = dataclasses.replace(model, rescorer=rescorer, info={**info, "rescorer_windows": windows})
    return model
