import pickle

import numpy as np
import pytest

from objcrop.proposals import backends
from objcrop.proposals.backends import BACKENDS, MissingDependencyError, backend_names, make_proposer, require
from objcrop.proposals.random_boxes import RandomBoxProposer, random_resized_crop_boxes
from tests.conftest import SHARED_DATA, tiny_bing_model, tiny_edge_model


def image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_registry_names_and_errors():
    assert backend_names()[0] == "gt" and "random" in backend_names()
    assert isinstance(make_proposer("random", n=3), RandomBoxProposer)
    with pytest.raises(ValueError, match="unknown proposal backend 'nope'; choose one of: gt, ") as err:
        make_proposer("nope")
    assert all(name in str(err.value) for name in backend_names())
    with pytest.raises(ValueError, match="--proposals gt"):
        make_proposer("gt")
    with pytest.raises(ValueError, match="it takes: n, scale, ratio, seed"):
        make_proposer("random", size=3)


def test_missing_optional_dependency_is_actionable(monkeypatch):
    def factory(threshold: float = 0.5):
        require("objcrop_no_such_module", "fancy", "fancy-proposals>=1.0")
        raise AssertionError("unreachable")

    monkeypatch.setitem(BACKENDS, "fancy", factory)
    with pytest.raises(MissingDependencyError, match=r"'fancy' needs the module .*pip install fancy-proposals>=1.0"):
        make_proposer("fancy")
    assert "fancy" in backends.backend_names()
    assert require("json", "x", "x").dumps([1]) == "[1]"


def test_random_boxes_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    boxes = random_resized_crop_boxes(2000, 200.0, 100.0, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes.dtype == np.float32 and boxes.shape == (2000, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200.001).all() and (boxes[:, 3] <= 100.001).all()
    frac = w * h / (200 * 100)
    assert frac.min() >= 0.2 - 1e-4 and frac.max() <= 1 + 1e-4
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    # the positions spread over the image
    assert boxes[:, 0].std() > 5 and boxes[:, 1].min() < 1


def test_random_boxes_fall_back_to_a_centred_box():
    # A 100x10 strip cannot hold 90% of its area at ratios 3/4..4/3: torchvision's fallback.
    boxes = random_resized_crop_boxes(5, 100.0, 10.0, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    expect = np.array([50 - 40 / 6, 0, 50 + 40 / 6, 10], np.float32)
    np.testing.assert_allclose(boxes, np.tile(expect, (5, 1)), rtol=1e-5)


def test_random_proposer_is_deterministic_per_image_and_seed():
    proposer = RandomBoxProposer(n=20, seed=1)
    a, sa = proposer(image(0))
    b, _ = RandomBoxProposer(n=20, seed=1)(image(0).copy())
    c, _ = proposer(image(1))
    d, _ = RandomBoxProposer(n=20, seed=2)(image(0))
    assert a.shape == (20, 4) and a.dtype == np.float32 and sa.dtype == np.float32 and sa.shape == (20,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    np.testing.assert_array_equal(proposer(image(0))[0], a)  # no state carried between calls
    # same pixels in another shape are another image
    flat = image(0).reshape(64, 48, 3)
    assert not np.array_equal(proposer(flat)[0], a)


def test_random_proposer_pickles_and_validates():
    proposer = RandomBoxProposer(n=7, scale=(0.5, 1), seed=3)
    back = pickle.loads(pickle.dumps(proposer))
    np.testing.assert_array_equal(back(image(5))[0], proposer(image(5))[0])
    with pytest.raises(ValueError, match="scale"):
        RandomBoxProposer(scale=(0, 1))
    with pytest.raises(ValueError, match="ratio"):
        RandomBoxProposer(ratio=(2, 1))
    assert RandomBoxProposer(n=0)(image(0))[0].shape == (0, 4)


# ---------------------------------------------------------------- contract: every registered backend

OPENCV_BING_MODEL = SHARED_DATA / "bing_objectness_model" / "ObjectnessTrainedModel"


def _opencv_bing(tmp_path):
    if not OPENCV_BING_MODEL.is_dir():
        pytest.skip(f"OpenCV's BING model files are absent ({OPENCV_BING_MODEL})")
    return {"model": str(OPENCV_BING_MODEL), "topk": 200}


# Small options of each registered backend (a function of a temporary folder); a new backend needs its line here.
CONTRACT_OPTIONS = {
    "bing": lambda tmp_path: {"model": tiny_bing_model(), "topk": 100},
    "opencv-bing": _opencv_bing,
    "selective-search": lambda tmp_path: {"max_side": 96, "topk": 100},
    "edgeboxes": lambda tmp_path: {"model": str(tiny_edge_model(tmp_path / "edges.yml")), "min_box_area": 100},
    "random": lambda tmp_path: {"n": 50, "seed": 1},
}


def contract_image(width: int = 160, height: int = 120) -> np.ndarray:
    """Noise with two bright rectangles: every backend finds something in it."""
    pixels = np.random.default_rng(0).integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    pixels[20:80, 30:110] = (220, 200, 180)
    pixels[85:115, 120:150] = (60, 160, 230)
    return pixels


@pytest.mark.shared_data  # opencv-bing's options skip, naming OpenCV's model files, without them
def test_every_registered_backend_has_contract_options():
    assert set(CONTRACT_OPTIONS) == set(BACKENDS)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", BACKENDS.names())
def test_every_backend_returns_float32_boxes_inside_the_image_best_first_and_pickles(name, tmp_path):
    try:
        proposer = make_proposer(name, **CONTRACT_OPTIONS[name](tmp_path))
    except MissingDependencyError as err:
        pytest.skip(str(err))
    for pixels in (contract_image(), contract_image(97, 61)):
        height, width = pixels.shape[:2]
        boxes, scores = proposer(pixels)
        assert boxes.dtype == np.float32 and scores.dtype == np.float32
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and scores.shape == (len(boxes),)
        assert len(boxes) > 0
        assert np.isfinite(boxes).all() and np.isfinite(scores).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (np.diff(scores) <= 0).all(), "best first: scores never increase"
        clone = pickle.loads(pickle.dumps(proposer))
        again_boxes, again_scores = clone(pixels)
        np.testing.assert_array_equal(again_boxes, boxes)
        np.testing.assert_array_equal(again_scores, scores)
