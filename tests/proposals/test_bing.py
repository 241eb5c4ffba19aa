import dataclasses
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from objcrop import boxes as B
from objcrop.analysis.recall import first_hit_ranks
from objcrop.cli import main
from objcrop.data.records import Record, Records
from objcrop.proposals.bing import (
    BingFilter,
    BingModel,
    BingProposer,
    TrainConfig,
    _kernels,
    binarize_weights,
    detect,
    load_model,
    load_opencv_model,
    sampling,
    save_model,
    size_grid,
    train_bing,
)
from objcrop.proposals.bing import train as bing_train
from objcrop.proposals.bing.detect import score_candidates
from objcrop.proposals.bing.features import ResizedImage, window_layout
from objcrop.proposals.bing.opencv_model import read_opencv_matrix
from objcrop.proposals.bing.rescore import prior_boxes
from objcrop.proposals.random_boxes import RandomBoxProposer
from tests.conftest import SHARED_DATA, needs_shared_data

DATA = SHARED_DATA
OPENCV_MODEL = DATA / "bing_objectness_model" / "ObjectnessTrainedModel"

SIDES = (16, 32, 64, 128)
CONFIG = TrainConfig(side_lengths=SIDES, min_boxes_per_size=2, negatives_per_image=60)


def scene(rng: np.random.Generator, width: int = 128, height: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Textured noise with one to three solid rectangles or ellipses; returns the image and their boxes."""
    img = np.clip(rng.normal(120, 18, (height, width, 3)), 0, 255).astype(np.uint8)
    boxes = []
    for k in range(int(rng.integers(1, 4))):
        bw, bh = (int(v) for v in rng.integers(18, 56, 2))
        x, y = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
        colour = tuple(int(c) for c in (rng.integers(200, 256, 3) if k % 2 == 0 else rng.integers(0, 40, 3)))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), colour, thickness=-1)
        else:
            cv2.ellipse(img, (x + bw // 2, y + bh // 2), (bw // 2, bh // 2), 0, 0, 360, colour, thickness=-1)
        boxes.append([x, y, x + bw, y + bh])
    return img, np.array(boxes, np.float32)


def write_dataset(folder: Path, n: int, seed: int) -> Records:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        img, boxes = scene(rng)
        Image.fromarray(img).save(folder / f"s{i:03d}.png")
        recs.append(Record(f"s{i:03d}.png", img.shape[1], img.shape[0], boxes, np.zeros(len(boxes), np.int32)))
    return Records.from_records(recs, ["blob"], root=str(folder))


def recall_at(proposer, records: Records, k: int) -> float:
    hits, total = 0, 0
    for i in range(len(records)):
        image = np.asarray(Image.open(records.path(i)).convert("RGB"))
        boxes, _ = proposer(image)
        ranks = first_hit_ranks(records.boxes_of(i), boxes[:k], [0.5])[0]
        hits += int((ranks < k).sum())
        total += len(ranks)
    return hits / total


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("bing")
    train = write_dataset(root / "train", 24, seed=0)
    test = write_dataset(root / "test", 10, seed=1)
    model = train_bing(train, ("rgb", "gray"), CONFIG, progress=False)
    return model, train, test, root


# ------------------------------------------------------------------ kernels


def reference_gradient(img: np.ndarray, summed: bool) -> np.ndarray:
    """OpenCV's gradientRGB / gradientGray / gradientHSV, written out in numpy."""
    x = img.astype(np.int32)
    dx = np.abs(x[:, 2:] - x[:, :-2])
    dy = np.abs(x[2:] - x[:-2])
    bx = np.abs(np.stack([x[:, 1] - x[:, 0], x[:, -1] - x[:, -2]], axis=1))
    by = np.abs(np.stack([x[1] - x[0], x[-1] - x[-2]], axis=0))
    combine = (lambda d: d.sum(-1)) if summed else (lambda d: d.max(-1))
    gx = np.zeros(img.shape[:2], np.int32)
    gy = np.zeros(img.shape[:2], np.int32)
    edge = 1 if summed else 2
    gx[:, 1:-1] = combine(dx) // (2 if summed else 1)
    gx[:, [0, -1]] = combine(bx) * edge
    gy[1:-1] = combine(dy) // (2 if summed else 1)
    gy[[0, -1]] = combine(by) * edge
    return np.minimum(gx + gy, 255).astype(np.uint8)


@pytest.mark.parametrize(("channels", "summed"), [(3, False), (3, True), (1, False)])
def test_normed_gradient_follows_opencv_rules(channels, summed):
    rng = np.random.default_rng(channels + summed)
    for h, w in [(2, 2), (9, 8), (23, 41)]:
        img = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img[: h // 2] //= 7  # weak and saturated gradients both occur
        mag = np.empty((h, w), np.uint8)
        _kernels.normed_gradient(img, summed, mag)
        np.testing.assert_array_equal(mag, reference_gradient(img, summed))


def test_binarized_and_float_responses_match_correlation():
    rng = np.random.default_rng(3)
    mag = rng.integers(0, 256, (30, 45), dtype=np.uint8)
    weights = rng.normal(size=(8, 8)).astype(np.float32)
    out = np.empty((23, 38), np.float32)
    _kernels.score_float(mag, weights, out)
    np.testing.assert_allclose(
        out, cv2.matchTemplate(mag.astype(np.float32), weights, cv2.TM_CCORR), rtol=1e-4, atol=1e-2
    )
    for num_bases, num_bits in [(2, 4), (1, 4), (3, 6), (4, 8), (2, 1)]:
        bases, coeffs = binarize_weights(weights, num_bases)
        signs = (bases[:, None] >> np.arange(63, -1, -1, dtype=np.uint64)[None]) & np.uint64(1)
        approx = (coeffs[:, None] * np.where(signs == 1, 1.0, -1.0)).sum(0).reshape(8, 8).astype(np.float32)
        drop = 8 - num_bits
        quantized = ((mag >> drop) << drop).astype(np.float32)
        expected = cv2.matchTemplate(quantized, approx, cv2.TM_CCORR)
        _kernels.score_binary(mag, bases, coeffs, num_bits, out)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-2)
        if (num_bases, num_bits) == (2, 4):
            fast = np.empty_like(out)
            _kernels.score_binary_2x4(mag, bases[0], bases[1], coeffs[0], coeffs[1], fast)
            np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-2)


def test_binarization_residual_shrinks_with_more_bases():
    weights = np.random.default_rng(0).normal(size=64).astype(np.float32)
    errors = []
    for n in range(1, 5):
        bases, coeffs = binarize_weights(weights, n)
        signs = (bases[:, None] >> np.arange(63, -1, -1, dtype=np.uint64)[None]) & np.uint64(1)
        approx = (coeffs[:, None] * np.where(signs == 1, 1.0, -1.0)).sum(0)
        errors.append(np.linalg.norm(weights - approx))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    with pytest.raises(ValueError, match="num_bases"):
        binarize_weights(weights, 5)


def collect(scores: np.ndarray, all_positions: bool, slope: float = 1.0, intercept: float = 0.0):
    h, w = scores.shape
    n = h * w
    out = [np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.float32), np.empty(n, np.float32)]
    scratch = np.empty((h + 2) * w, np.float32)
    k = _kernels._collect_maxima(scores, slope, intercept, 3, all_positions, scratch, *out, 0)
    return [a[:k] for a in out]


def brute_force_maxima(grid: np.ndarray) -> list[int]:
    h, w = grid.shape
    padded = np.pad(grid, 1, constant_values=-np.inf)
    out = []
    for y in range(h):
        for x in range(w):
            win = padded[y : y + 3, x : x + 3].ravel()  # raster order; the centre is win[4]
            if (win[4] > win[:4]).all() and (win[4] >= win[5:]).all():
                out.append(y * w + x)
    return out


def test_local_maxima_and_greedy_selection():
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (1, 6), (5, 1), (2, 2), (9, 4)]:
        grid = rng.integers(0, 3, shape).astype(np.float32)
        np.testing.assert_array_equal(collect(grid, False)[1], brute_force_maxima(grid))
    h, w = 17, 23
    grid = rng.integers(0, 6, (h, w)).astype(np.float32)  # many ties
    ids, pos, val, raw = collect(grid, False, 2.0, 1.0)
    np.testing.assert_array_equal(pos, brute_force_maxima(grid))
    np.testing.assert_array_equal(raw, grid.ravel()[pos])
    np.testing.assert_allclose(val, 2 * raw + 1)
    assert (ids == 3).all()
    yx = np.stack([pos // w, pos % w], axis=1)
    assert (np.abs(yx[:, None] - yx[None]).max(-1) + 9 * np.eye(len(yx), dtype=int)).min() >= 2  # never adjacent

    scores = rng.normal(size=(h, w)).astype(np.float32)
    ids, pos, val, _ = collect(scores, True)
    np.testing.assert_array_equal(pos, np.arange(h * w))
    res_h, res_w = np.array([0, 0, 0, h]), np.array([0, 0, 0, w])
    taken = np.empty(h * w, np.uint8)
    chosen = _kernels.select_windows(ids, pos, val, res_h, res_w, 1000, 2, 0, taken)
    picked = pos[chosen]
    assert (np.diff(val[chosen]) <= 0).all()
    assert picked[0] == np.argmax(scores)
    yx = np.stack([picked // w, picked % w], axis=1)
    gap = np.abs(yx[:, None] - yx[None]).max(-1) + np.eye(len(yx), dtype=int) * 99
    assert gap.min() > 2  # no two chosen windows within the 5x5 suppression neighbourhood
    # Greedy: every window left out lies next to a better chosen one.
    left_out = np.setdiff1d(np.arange(h * w), picked)
    near = np.abs(np.stack([left_out // w, left_out % w], 1)[:, None] - yx[None]).max(-1) <= 2
    assert (near & (scores.ravel()[picked][None] >= scores.ravel()[left_out][:, None])).any(axis=1).all()
    capped = _kernels.select_windows(ids, pos, val, res_h, res_w, 1000, 2, 7, taken)
    np.testing.assert_array_equal(capped, chosen[:7])


def test_pyramid_halving_matches_box_filter():
    rng = np.random.default_rng(8)
    for sh, sw, dh, dw, c in [(9, 11, 5, 6, 3), (9, 11, 9, 5, 1), (8, 8, 4, 8, 3), (7, 6, 4, 3, 3)]:
        src = rng.integers(0, 256, (sh, sw, c), dtype=np.uint8)
        dst = np.empty((dh, dw, c), np.uint8)
        scratch = [np.empty((sw + 1) * c, np.uint16) for _ in range(2)]
        _kernels.halve(src, dst, *scratch)
        ys = (
            np.minimum(np.stack([2 * np.arange(dh), 2 * np.arange(dh) + 1]), sh - 1)
            if dh != sh
            else np.stack([np.arange(dh)] * 2)
        )
        xs = (
            np.minimum(np.stack([2 * np.arange(dw), 2 * np.arange(dw) + 1]), sw - 1)
            if dw != sw
            else np.stack([np.arange(dw)] * 2)
        )
        s = src.astype(np.int32)
        total = sum(s[ys[a]][:, xs[b]] for a in range(2) for b in range(2))
        np.testing.assert_array_equal(dst, (total + 2) >> 2)
    image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    layout = window_layout(130, 90, size_grid(SIDES))
    pyramid = ResizedImage.build(image, "rgb", layout, mode="pyramid")
    direct = ResizedImage.build(image, "rgb", layout, mode="direct")
    np.testing.assert_array_equal(pyramid.offsets, direct.offsets)
    first = int(np.argmax(layout.map_w.astype(int) * layout.map_h))
    np.testing.assert_array_equal(pyramid.gradient(first), direct.gradient(first))  # the largest map is resized
    with pytest.raises(ValueError, match="resize mode"):
        ResizedImage.build(image, "rgb", layout, mode="area")


# ------------------------------------------------------------------ training and detection


def test_training_finds_planted_objects_better_than_random_boxes(synthetic):
    model, _, test, _ = synthetic
    assert model.colour_spaces == ("rgb", "gray")
    bing = recall_at(BingProposer(model, topk=10), test, 10)
    random = recall_at(RandomBoxProposer(n=10, scale=(0.03, 0.3), ratio=(0.5, 2.0)), test, 10)
    assert bing >= 0.6
    assert bing >= 2 * random


def test_detect_output_contract(synthetic):
    model, _, test, _ = synthetic
    image = np.asarray(Image.open(test.path(0)).convert("RGB"))
    boxes, scores = detect(model, image, 50)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.shape == (50, 4) and scores.shape == (50,)
    assert (np.diff(scores) <= 0).all()
    h, w = image.shape[:2]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    float_boxes, _ = detect(model, image, 50, binarized=False)
    assert float_boxes.shape == (50, 4)
    # Proposal builders send the proposer to worker processes.
    proposer = pickle.loads(pickle.dumps(BingProposer(model, topk=50)))
    np.testing.assert_array_equal(proposer(image)[0], boxes)


def test_binarized_scores_rank_like_float_scores(synthetic):
    model, _, test, _ = synthetic
    image = np.asarray(Image.open(test.path(1)).convert("RGB"))
    exact, _ = score_candidates(model, image, binarized=False, all_positions=True)
    approx, _ = score_candidates(model, image, binarized=True, all_positions=True)
    np.testing.assert_array_equal(exact.position, approx.position)
    for fi in range(len(model.filters)):
        mine = exact.filter_index == fi
        # Noise-only windows (most of a synthetic scene) lose their low bit planes, hence 0.8 here, 0.97+ on photos.
        assert spearmanr(exact.raw[mine], approx.raw[mine]).statistic > 0.8


def test_model_round_trips_exactly(synthetic, tmp_path):
    model, _, test, _ = synthetic
    path = save_model(model, tmp_path / "sub" / "bing.npz")
    assert [p.name for p in path.parent.iterdir()] == ["bing.npz"]  # no temp file left behind
    loaded = load_model(path)
    assert loaded.colour_spaces == model.colour_spaces
    assert (loaded.num_bases, loaded.num_bits, loaded.nss) == (model.num_bases, model.num_bits, model.nss)
    assert loaded.info == model.info
    for a, b in zip(model.filters, loaded.filters, strict=True):
        for name in ("weights", "sizes", "calibration"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    image = np.asarray(Image.open(test.path(2)).convert("RGB"))
    for out_a, out_b in zip(detect(model, image), BingProposer(path)(image), strict=True):
        np.testing.assert_array_equal(out_a, out_b)


def test_rescorer_trains_round_trips_and_reranks(synthetic, tmp_path):
    model, train, test, _ = synthetic
    cfg = dataclasses.replace(CONFIG, rescore=True, rescore_pool=300, num_priors=20)
    rescored = train_bing(train, ("rgb",), cfg, progress=False)
    r = rescored.rescorer
    assert r is not None and r.pool == 300 and r.priors.shape == (20, 4)
    assert (r.priors >= 0).all() and (r.priors <= 1).all()
    image = np.asarray(Image.open(test.path(0)).convert("RGB"))
    boxes, scores = detect(rescored, image, 50)
    assert boxes.shape == (50, 4) and (np.diff(scores) <= 0).all()
    plain, _ = detect(rescored, image, 50, rescore=False)
    assert not np.array_equal(plain, boxes)
    loaded = load_model(save_model(rescored, tmp_path / "r.npz"))
    for name in ("priors", "mean", "scale", "weights"):
        assert getattr(loaded.rescorer, name).tobytes() == getattr(r, name).tobytes()
    assert loaded.rescorer.bias == np.float32(r.bias)
    for a, b in zip(detect(loaded, image, 50), (boxes, scores), strict=True):
        np.testing.assert_array_equal(a, b)
    assert recall_at(BingProposer(rescored, topk=10), test, 10) >= 0.5


# ------------------------------------------------------------------ training cost: solver and sample caps


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))


def test_primal_solver_learns_the_old_dual_solvers_filter(synthetic):
    _, train, test, _ = synthetic
    primal = train_bing(train, ("rgb",), CONFIG, progress=False)
    dual = train_bing(train, ("rgb",), dataclasses.replace(CONFIG, svm_solver="dual"), progress=False)
    # Same objective, two solvers: the same optimum, hence the same detector.
    assert cosine(primal.filters[0].weights, dual.filters[0].weights) > 0.999
    np.testing.assert_allclose(primal.filters[0].calibration, dual.filters[0].calibration, rtol=0.05, atol=0.05)
    r_primal = recall_at(BingProposer(primal, topk=10), test, 10)
    r_dual = recall_at(BingProposer(dual, topk=10), test, 10)
    assert r_dual >= 0.6 and r_primal >= 0.6
    assert abs(r_primal - r_dual) <= 0.05


def test_training_samples_stay_within_the_caps(synthetic, monkeypatch):
    _, train, test, _ = synthetic
    cfg = dataclasses.replace(
        CONFIG, max_positives=40, max_negatives=100, max_calibration_windows=30, rescore=True, rescore_pool=100,
        num_priors=10, max_rescore_windows=500,
    )  # fmt: skip
    fits, calibrations = [], []
    fit_filter, fit_calibration = bing_train._fit_filter, bing_train._fit_calibration

    def spy_filter(pos, neg, *args):
        fits.append((len(pos), len(neg)))
        return fit_filter(pos, neg, *args)

    def spy_calibration(raw, label):
        calibrations.append(len(raw))
        return fit_calibration(raw, label)

    monkeypatch.setattr(bing_train, "_fit_filter", spy_filter)
    monkeypatch.setattr(bing_train, "_fit_calibration", spy_calibration)
    model = train_bing(train, ("rgb",), cfg, progress=False)
    full = train_bing(train, ("rgb",), CONFIG, progress=False)
    # The uncapped run has more of everything, so every cap binds exactly.
    assert full.info["stage1_positives"] > 40 and full.info["stage1_negatives"] > 100
    assert fits[0] == (40, 100)
    assert model.info["stage1_positives"] == 40 and model.info["stage1_negatives"] == 100
    n_sizes = len(model.sizes)
    assert max(calibrations[:n_sizes]) == 30 and model.info["stage2_windows"] <= 30 * n_sizes
    assert model.info["stage2_windows"] < full.info["stage2_windows"]
    assert model.info["rescorer_windows"] == 500
    # 40 positives and 100 negatives still learn a useful filter.
    assert recall_at(BingProposer(model, topk=10, rescore=False), test, 10) >= 0.5


def test_training_is_deterministic_for_a_seed(synthetic):
    _, train, _, _ = synthetic
    small = train.subset(np.arange(10))
    # Caps that bind, so that every seeded draw is exercised.
    cfg = dataclasses.replace(CONFIG, max_positives=30, max_negatives=150, max_calibration_windows=40)
    a = train_bing(small, ("rgb",), cfg, progress=False)
    b = train_bing(small, ("rgb",), cfg, workers=2, progress=False)
    c = train_bing(small, ("rgb",), cfg, seed=1, progress=False)
    assert a.info == b.info
    for fa, fb in zip(a.filters, b.filters, strict=True):
        assert fa.weights.tobytes() == fb.weights.tobytes()
        assert fa.calibration.tobytes() == fb.calibration.tobytes()
    assert a.filters[0].weights.tobytes() != c.filters[0].weights.tobytes()


def test_sampling_budget_and_reservoir():
    assert sampling.per_image_budget(100, None, 10) == 100
    assert sampling.per_image_budget(100, 250, 10) == 25
    assert sampling.per_image_budget(100, 251, 10) == 26
    assert sampling.per_image_budget(10, 10**6, 10) == 10
    rng = np.random.default_rng(0)
    group, key, value = rng.integers(0, 3, 5000), rng.random(5000), np.arange(5000)
    whole = sampling.Reservoir(400)
    whole.add(group, key, value=value)
    chunked = sampling.Reservoir(400, buffer=100)  # compacts many times on the way
    for lo in range(0, 5000, 37):
        chunked.add(group[lo : lo + 37], key[lo : lo + 37], value=value[lo : lo + 37])
    g, kept = whole.result()
    g2, kept2 = chunked.result()
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(kept["value"], kept2["value"])
    assert (np.diff(kept["value"]) > 0).all()  # arrival order
    for k in range(3):
        mine = kept["value"][g == k]
        assert len(mine) == 400
        # the 400 smallest keys of the group
        np.testing.assert_array_equal(np.sort(mine), np.sort(value[group == k][np.argsort(key[group == k])[:400]]))
    everything = sampling.Reservoir(None, buffer=10)
    for lo in range(0, 5000, 1000):
        everything.add(group[lo : lo + 1000], key[lo : lo + 1000], value=value[lo : lo + 1000])
    np.testing.assert_array_equal(everything.result()[1]["value"], value)
    with pytest.raises(ValueError, match="no items"):
        sampling.Reservoir(5).result()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("svm_c", float("nan")),
        ("svm_c", float("inf")),
        ("svm_c", 0.0),
        ("positive_iou", float("nan")),
        ("positive_iou", 1.5),
        ("size_groups", (float("inf"),)),
        ("negatives_per_image", 0),
        ("max_negatives", 0),
        ("max_positives", 2.5),
        ("max_calibration_windows", True),
        ("max_rescore_windows", -1),
        ("side_lengths", ()),
        ("svm_solver", "sgd"),
        ("resize", "area"),
        ("num_bits", 0),
    ],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_prior_boxes_cover_the_most_objects():
    gt = np.array([[0, 0, 0.5, 0.5], [0.01, 0, 0.5, 0.5], [0, 0.01, 0.5, 0.5], [0.5, 0.5, 1, 1]], np.float32)
    priors = prior_boxes(gt, 5)
    assert len(priors) == 2  # two boxes cover all four objects
    assert B.iou(priors[:1], gt[:3]).min() >= 0.5
    assert prior_boxes(np.zeros((0, 4)), 3).shape == (0, 4)


def test_model_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a BING model"):
        load_model(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a BING model"):
        load_model(tmp_path / "junk.npz")


def test_save_model_replaces_only_its_own_model_files(synthetic, tmp_path):
    model = synthetic[0]
    ours = save_model(model, tmp_path / "ours.npz")
    assert save_model(model, ours) == ours  # its own file: replaced
    for name, content in (("theirs.npz", None), ("junk.npz", b"not a zip"), ("notes.txt", b"mine")):
        path = tmp_path / name
        np.savez(path, x=np.zeros(3)) if content is None else path.write_bytes(content)
        before = path.read_bytes()
        with pytest.raises(ValueError, match="not a BING model file objcrop wrote"):
            save_model(model, path)
        assert path.read_bytes() == before
    with pytest.raises(IsADirectoryError):
        save_model(model, tmp_path)


# ------------------------------------------------------------------ bad inputs


def test_tiny_grayscale_and_bad_images(synthetic):
    model, _, test, _ = synthetic
    boxes, scores = detect(model, np.zeros((6, 7, 3), np.uint8))  # smaller than half the smallest window
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    rgb = np.asarray(Image.open(test.path(3)).convert("RGB"))
    gray = rgb[:, :, 1]
    for a, b in zip(detect(model, gray), detect(model, np.repeat(gray[:, :, None], 3, axis=2)), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="uint8"):
        detect(model, rgb.astype(np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        detect(model, np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        detect(model, np.zeros((1, 40, 3), np.uint8))


def test_training_rejects_unusable_data(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        train_bing(Records.from_records([], ["x"]), config=CONFIG, progress=False)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    outside = Record(
        "a.png", 50, 40, np.array([[60, 50, 90, 80], [-30, -30, -1, -1]], np.float32), np.zeros(2, np.int32)
    )
    with pytest.raises(ValueError, match="no usable GT box"):
        train_bing(Records.from_records([outside], ["x"], root=str(tmp_path)), config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="colour spaces"):
        train_bing(Records.from_records([outside], ["x"], root=str(tmp_path)), ("lab",), progress=False)


def test_boxes_partly_outside_are_clipped_and_unreadable_images_skipped(tmp_path):
    records = write_dataset(tmp_path, 8, seed=4)
    recs = list(records)
    recs[0].boxes = recs[0].boxes + np.float32([-200, 0, 0, 0])  # reaches far left of the image
    recs.append(Record("missing.png", 128, 96, np.float32([[10, 10, 60, 60]]), np.zeros(1, np.int32)))
    model = train_bing(Records.from_records(recs, ["blob"], root=str(tmp_path)), config=CONFIG, progress=False)
    assert model.info["trained_on"]["skipped"] == 1
    assert len(model.sizes) >= 1


def test_filter_and_model_validation():
    good = BingFilter("rgb", np.zeros((8, 8)), [[16, 16]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="colour space"):
        BingFilter("lab", np.zeros((8, 8)), [[16, 16]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"\[8, 8\]"):
        BingFilter("rgb", np.zeros((4, 4)), [[16, 16]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="calibration"):
        BingFilter("rgb", np.zeros((8, 8)), [[16, 16]], [[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="at least one filter"):
        BingModel(())
    with pytest.raises(ValueError, match="num_bits"):
        BingModel((good,), num_bits=9)


def test_window_layout_skips_and_clips_sizes():
    layout = window_layout(100, 70, size_grid((16, 128, 256)))
    kept = size_grid((16, 128, 256))[layout.index]
    assert sorted(map(tuple, kept.tolist())) == [(16, 16), (16, 128), (128, 16), (128, 128)]  # 256 > 2 x image
    boxes = layout.boxes(np.arange(len(kept)), np.zeros(len(kept), np.int64))
    assert (boxes[:, 2] <= 100 + 1e-4).all() and (boxes[:, 3] <= 70 + 1e-4).all()
    big = np.flatnonzero((kept == 128).all(axis=1))[0]
    np.testing.assert_allclose(boxes[big], [0, 0, 100, 70], atol=1e-4)  # clipped to the image


# ------------------------------------------------------------------ OpenCV's model


@needs_shared_data("bing_objectness_model/ObjectnessTrainedModel", "coco128/train2017")
def test_opencv_model_loads_and_gives_sensible_boxes():
    model = load_opencv_model(OPENCV_MODEL)
    assert model.colour_spaces == ("rgb", "hsv", "gray")
    raw = read_opencv_matrix(OPENCV_MODEL / "ObjNessB2W8MAXBGR.wS2.yml.gz")
    f = model.filters[0]
    assert f.sizes.shape == (28, 2) and raw.shape == (28, 2)
    np.testing.assert_allclose(f.calibration[:, 0] * 16, raw[:, 0], rtol=1e-6)
    assert set(np.unique(f.sizes)) <= {16, 32, 64, 128, 256, 512}

    image = np.asarray(Image.open(sorted((DATA / "coco128" / "train2017").glob("*.jpg"))[0]).convert("RGB"))
    boxes, scores = BingProposer(model, topk=300)(image)
    h, w = image.shape[:2]
    assert len(boxes) == 300 and (np.diff(scores) <= 0).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    exact, _ = score_candidates(model, image, binarized=False, all_positions=True)
    approx, _ = score_candidates(model, image, binarized=True, all_positions=True)
    assert spearmanr(exact.raw, approx.raw).statistic > 0.9


def test_opencv_matrix_reader_errors(tmp_path):
    bad = tmp_path / "x.yml"
    bad.write_text("%YAML:1.0\nm: !!opencv-matrix\n   rows: 2\n   cols: 2\n   dt: f\n   data: [ 1., 2., 3. ]\n")
    with pytest.raises(ValueError, match="3 values for a 2x2"):
        read_opencv_matrix(bad)
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not an OpenCV"):
        read_opencv_matrix(bad)
    with pytest.raises(FileNotFoundError):
        load_opencv_model(tmp_path / "nowhere")


# ------------------------------------------------------------------ command line


@pytest.mark.shared_data  # imports OpenCV's model files where they are present
def test_cli_train_and_import(tmp_path, capsys):
    records = write_dataset(tmp_path / "images", 12, seed=7)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "blob"}]}
    for i, rec in enumerate(records):
        coco["images"].append({"id": i + 1, "file_name": rec.path, "width": rec.width, "height": rec.height})
        for b in rec.boxes.tolist():
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                }
            )
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "model.npz"
    argv = ["bing", "train", "--format", "coco", "--annotations", str(tmp_path / "ann.json"),
            "--images", str(tmp_path / "images"), "--out", str(out), "--colour-spaces", "rgb,hsv",
            "--sides", "16,32,64,128", "--min-boxes", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert load_model(out).colour_spaces == ("rgb", "hsv")
    assert "wrote" in capsys.readouterr().out
    assert main([*argv, "--colour-spaces", "lab"]) == 2
    # Bad numbers fail before any image is read, with exit code 2.
    assert main([*argv, "--svm-c", "nan"]) == 2
    assert main([*argv, "--max-negatives", "0"]) == 2
    capsys.readouterr()
    assert main([*argv, "--svm-solver", "dual", "--max-negatives", "none", "--max-positives", "50"]) == 0
    assert "stage I: 50 positives" in capsys.readouterr().out
    assert load_model(out).info["config"]["svm_solver"] == "dual"
    # A file that is not an objcrop BING model is refused before training, and kept.
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, weights=np.ones(3))
    before = theirs.read_bytes()
    assert main([*argv, "--out", str(theirs)]) == 2  # the last --out wins
    assert str(theirs) in capsys.readouterr().err and theirs.read_bytes() == before
    if OPENCV_MODEL.is_dir():
        out2 = tmp_path / "opencv.npz"
        assert main(["bing", "import-opencv", "--opencv-dir", str(OPENCV_MODEL), "--out", str(out2)]) == 0
        assert load_model(out2).colour_spaces == ("rgb", "hsv", "gray")
