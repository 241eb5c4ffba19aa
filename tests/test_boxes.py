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


# Boundaries and dtypes the tests above leave open (found by mutation testing, docs/testing.md).


def test_empty_boxes_are_float32():
    assert B.as_boxes([]).dtype == np.float32


def test_area_clips_each_inverted_side_on_its_own():
    boxes = [
        [5, 0, 3, 10],  # inverted in x only
        [0, 5, 10, 3],  # inverted in y only
        [0, 0, 0.5, 10],  # sides under one pixel
        [0, 0, 10, 0.5],
        [0, 10, 10, 20],  # away from the origin
    ]
    np.testing.assert_allclose(B.area(boxes), [0, 0, 5, 5, 100])


def test_iou_of_non_square_boxes_and_of_sub_pixel_boxes():
    # x2 != y2, so a mix-up of the corner columns changes the overlap.
    np.testing.assert_allclose(B.iou([[0, 0, 20, 10]], [[10, 0, 30, 10]]), [[1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(B.iou([[0, 0, 10, 20]], [[0, 10, 10, 30]]), [[1 / 3]], rtol=1e-6)
    # A union below one pixel is still a union.
    np.testing.assert_allclose(B.iou([[0, 0, 0.5, 0.5]], [[0, 0, 0.5, 0.5]]), [[1.0]])


def test_box_functions_return_float32():
    assert B.iou([[0, 0, 10, 10]], [[5, 5, 15, 15]]).dtype == np.float32
    assert B.cxcywh_norm_to_xyxy([[0.5, 0.5, 0.5, 0.5]], 100, 100).dtype == np.float32
    assert B.expand_to_min_size([[0, 0, 10, 10]], 20, 100, 100).dtype == np.float32


def test_iou_of_empty_boxes_is_zero_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(B.iou([[1, 1, 1, 1], [3, 3, 2, 2]], [[1, 1, 1, 1]]), [[0], [0]])


def test_valid_mask_boundaries():
    cases = [
        ([10, 10, 11, 11], True),  # sides of exactly min_size = 1
        ([50, 0, 50.5, 10], False),  # thinner than 1 in x, away from the origin
        ([0, 10, 10, 9.5], False),  # inverted in y
        ([0, 0, np.inf, 10], False),  # infinite, though its sides are long
        ([-20, 10, 0, 50], False),  # touches the left edge from outside
        ([-20, 10, 0.5, 50], True),  # overlaps the image by half a pixel
        ([10, -20, 50, 0], False),  # touches the top edge from outside
        ([10, -20, 50, 0.5], True),
        ([100, 10, 120, 50], False),  # starts at the right edge (width 100)
        ([10, 100, 50, 120], False),  # starts at the bottom edge (height 100)
        ([10, 10, 150, 50], True),  # sticks out to the right only (x2 > height, y1 inside)
    ]
    boxes = np.array([b for b, _ in cases], np.float32)
    np.testing.assert_array_equal(B.valid_mask(boxes, 100, 100), [ok for _, ok in cases])


def test_valid_mask_checks_the_image_only_when_both_sides_are_given():
    outside = [[200, 200, 300, 300]]
    np.testing.assert_array_equal(B.valid_mask(outside), [True])
    np.testing.assert_array_equal(B.valid_mask(outside, 100, None), [True])
    np.testing.assert_array_equal(B.valid_mask(outside, 100, 100), [False])


def test_valid_mask_of_infinite_boxes_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(B.valid_mask([[np.inf, 0, np.inf, 10]], 100, 100), [False])


def test_sanitize_clips_to_both_sides_and_honours_min_size():
    boxes = [[50, 50, 150, 160], [10, 10, 11, 11], [10, 10, 14, 30]]
    kept, mask = B.sanitize(boxes, 100, 120)
    np.testing.assert_array_equal(mask, [True, True, True])
    np.testing.assert_allclose(kept, [[50, 50, 100, 120], [10, 10, 11, 11], [10, 10, 14, 30]])
    _, mask = B.sanitize(boxes, 100, 120, min_size=5)
    np.testing.assert_array_equal(mask, [True, False, False])


def test_sanitize_drops_boxes_outside_the_image_even_with_min_size_zero():
    # Clipping turns them into zero-width boxes on the border, which min_size=0 would keep.
    boxes = [[200, 10, 300, 50], [10, 200, 50, 300], [10, 10, 50, 50]]
    _, mask = B.sanitize(boxes, 100, 100, min_size=0)
    np.testing.assert_array_equal(mask, [False, False, True])


def test_shift_draws_each_box_its_own_radius_then_its_own_direction():
    boxes = np.tile(np.array([[900, 900, 1000, 1050]], np.float32), (50, 1))
    moved = B.shift(boxes, (80, 100), 2000, 2000, np.random.default_rng(3))
    draw = np.random.default_rng(3)
    r = draw.uniform(80, 100, size=50)
    theta = draw.uniform(0, 2 * np.pi, size=50)
    d = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    np.testing.assert_allclose(moved, boxes + np.concatenate([d, d], axis=1), atol=1e-3)


def test_boxes_pushed_past_the_top_left_corner_land_on_it():
    np.testing.assert_allclose(B.expand_to_min_size([[0, 0, 20, 20]], 224, 640, 480), [[0, 0, 224, 224]])


def test_cxcywh_uses_each_coordinate_once():
    out = B.cxcywh_norm_to_xyxy([[0.25, 0.75, 0.5, 0.25]], 200, 100)
    np.testing.assert_allclose(out, [[0, 62.5, 100, 87.5]])
