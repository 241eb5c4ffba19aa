import numpy as np
import pytest

from objcrop import boxes as B


def official_dilate(boxes, delta, width, height):
    """The official release's dilation (each coordinate scaled by itself), for comparison."""
    b = B.as_boxes(boxes).copy()
    b[:, :2] -= b[:, :2] * delta
    b[:, 2:] += b[:, 2:] * delta
    return B.clip(b, width, height)


def test_as_boxes_shapes_and_dtype():
    assert B.as_boxes([1, 2, 3, 4]).shape == (1, 4)
    assert B.as_boxes([]).shape == (0, 4)
    assert B.as_boxes(np.zeros((3, 4), np.float64)).dtype == np.float32
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        B.as_boxes(np.zeros((2, 3)))


def test_area_clip_and_iou():
    boxes = np.array([[0, 0, 10, 20], [5, 5, 3, 3]], np.float32)
    np.testing.assert_allclose(B.area(boxes), [200, 0])
    np.testing.assert_allclose(B.clip([[-5, -5, 50, 60]], 40, 30), [[0, 0, 40, 30]])
    iou = B.iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]], rtol=1e-6)
    assert B.iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0


def test_valid_mask_and_sanitize_drop_unusable_boxes():
    boxes = np.array(
        [
            [10, 10, 50, 50],  # fine
            [np.nan, 0, 10, 10],  # not finite
            [5, 5, 5.5, 30],  # thinner than min_size
            [200, 10, 300, 50],  # right of the image
            [-20, -20, 30, 30],  # overlaps: clipped, kept
        ],
        np.float32,
    )
    np.testing.assert_array_equal(B.valid_mask(boxes, 100, 100), [True, False, False, False, True])
    kept, mask = B.sanitize(boxes, 100, 100)
    np.testing.assert_array_equal(mask, [True, False, False, False, True])
    np.testing.assert_allclose(kept, [[10, 10, 50, 50], [0, 0, 30, 30]])


def test_dilate_grows_each_side_by_delta_times_image_size():
    out = B.dilate([[100, 50, 200, 150]], 0.1, 640, 480)
    np.testing.assert_allclose(out, [[100 - 64, 50 - 48, 200 + 64, 150 + 48]])


def test_dilate_clips_to_the_image():
    out = B.dilate([[10, 20, 600, 470]], 0.1, 640, 480)
    np.testing.assert_allclose(out, [[0, 0, 640, 480]])
    np.testing.assert_allclose(B.dilate([[10, 20, 30, 40]], 0.0, 640, 480), [[10, 20, 30, 40]])


def test_dilate_differs_from_the_official_self_scaled_version():
    # A box touching the left edge: ours grows it right by delta * W = 40 px and 30 px up/down;
    # the official code grows x2 by x2 * delta = 5 px and leaves x1 = 0 because 0 * delta = 0.
    box = [[0, 100, 50, 200]]
    ours = B.dilate(box, 0.1, 400, 300)
    official = official_dilate(box, 0.1, 400, 300)
    np.testing.assert_allclose(ours, [[0, 70, 90, 230]])
    np.testing.assert_allclose(official, [[0, 90, 55, 220]])
    # Two equal boxes at different places grow by the same amount in ours, not in the official one.
    two = [[100, 100, 150, 150], [400, 300, 450, 350]]
    ours_sizes = np.diff(B.dilate(two, 0.05, 640, 480).reshape(2, 2, 2), axis=1)
    official_sizes = np.diff(official_dilate(two, 0.05, 640, 480).reshape(2, 2, 2), axis=1)
    np.testing.assert_allclose(ours_sizes[0], ours_sizes[1])
    assert not np.allclose(official_sizes[0], official_sizes[1])


def test_shift_moves_by_a_radius_in_range_when_not_clamped():
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([[900, 900, 1000, 1050]], np.float32), (500, 1))
    moved = B.shift(boxes, (80, 100), 2000, 2000, rng)
    d = moved - boxes
    np.testing.assert_allclose(d[:, :2], d[:, 2:], atol=1e-3)  # translation only
    radius = np.hypot(d[:, 0], d[:, 1])
    assert radius.min() >= 80 - 1e-3 and radius.max() <= 100 + 1e-3
    # Directions cover all four quadrants.
    quadrants = {(bool(dx > 0), bool(dy > 0)) for dx, dy in d[:, :2]}
    assert len(quadrants) == 4


def test_shift_with_a_scalar_radius_moves_by_exactly_that_radius():
    moved = B.shift([[100, 100, 150, 150]], 30.0, 500, 500, np.random.default_rng(1))
    d = moved[0, :2] - np.array([100, 100])
    assert np.hypot(*d) == pytest.approx(30.0, abs=1e-3)


def test_shift_keeps_boxes_inside_and_their_size():
    rng = np.random.default_rng(2)
    boxes = np.array([[0, 0, 40, 30], [600, 440, 640, 480], [0, 0, 640, 480], [10, 400, 100, 480]], np.float32)
    for _ in range(50):
        moved = B.shift(boxes, (80, 100), 640, 480, rng)
        assert (moved[:, :2] >= 0).all() and (moved[:, 2] <= 640).all() and (moved[:, 3] <= 480).all()
        np.testing.assert_allclose(moved[:, 2:] - moved[:, :2], boxes[:, 2:] - boxes[:, :2], atol=1e-3)


def test_expand_to_min_size_grows_small_boxes_around_their_centre():
    out = B.expand_to_min_size([[300, 200, 310, 210]], 224, 640, 480)
    np.testing.assert_allclose(out, [[305 - 112, 205 - 112, 305 + 112, 205 + 112]])


def test_expand_to_min_size_shifts_grown_boxes_inside_the_image():
    out = B.expand_to_min_size([[0, 460, 20, 480]], 224, 640, 480)
    np.testing.assert_allclose(out, [[0, 480 - 224, 224, 480]])


def test_expand_to_min_size_keeps_large_sides_and_caps_at_the_image():
    big = [[10, 10, 400, 300]]
    np.testing.assert_allclose(B.expand_to_min_size(big, 224, 640, 480), big)
    wide = B.expand_to_min_size([[100, 200, 400, 210]], 224, 640, 480)
    np.testing.assert_allclose(wide, [[100, 205 - 112, 400, 205 + 112]])
    np.testing.assert_allclose(B.expand_to_min_size([[10, 10, 20, 20]], 224, 100, 80), [[0, 0, 100, 80]])


def test_format_conversions():
    np.testing.assert_allclose(B.xywh_to_xyxy([[10, 20, 30, 40]]), [[10, 20, 40, 60]])
    np.testing.assert_allclose(B.cxcywh_norm_to_xyxy([[0.5, 0.5, 0.5, 0.25]], 200, 100), [[50, 37.5, 150, 62.5]])
