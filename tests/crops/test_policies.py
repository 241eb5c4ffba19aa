import numpy as np
import pytest

from objcrop import boxes as B
from objcrop.crops.policies import (
    KIND_CODES,
    POLICIES,
    VIEW_KINDS,
    ViewPairPolicy,
    make_policy,
    random_resized_crop_box,
)

W, H = 640, 480
PROPOSALS = np.array([[100, 80, 300, 260], [350, 200, 600, 450], [20, 300, 120, 460]], np.float32)


def sample_many(policy, n, proposals=PROPOSALS, seed=0, width=W, height=H):
    rng = np.random.default_rng(seed)
    return [policy.sample(width, height, proposals, rng) for _ in range(n)]


def test_kind_codes_follow_view_kinds():
    assert [KIND_CODES[k] for k in VIEW_KINDS] == [0, 1, 2, 3]


@pytest.mark.parametrize("name", list(POLICIES))
def test_each_policy_gives_its_kinds(name):
    unswapped = sample_many(ViewPairPolicy(name, swap=False), 20)
    assert all(p.kinds == POLICIES[name] and not p.fallback for p in unswapped)
    swapped = sample_many(ViewPairPolicy(name), 50)
    assert {p.kinds for p in swapped} == {POLICIES[name], POLICIES[name][::-1]}


@pytest.mark.parametrize("name", list(POLICIES))
def test_crops_lie_inside_their_regions_and_regions_inside_the_image(name):
    for pair in sample_many(ViewPairPolicy(name, min_box_size=100), 300):
        assert pair.regions.shape == pair.crops.shape == (2, 4)
        assert pair.regions.dtype == pair.crops.dtype == np.float32
        eps = 1e-3
        assert (pair.regions[:, :2] >= -eps).all() and (pair.regions[:, 2] <= W + eps).all()
        assert (pair.regions[:, 3] <= H + eps).all()
        assert (pair.crops[:, :2] >= pair.regions[:, :2] - eps).all()
        assert (pair.crops[:, 2:] <= pair.regions[:, 2:] + eps).all()
        assert (B.area(pair.crops) > 0).all()
        for kind, region in zip(pair.kinds, pair.regions, strict=True):
            if kind == "scene":
                np.testing.assert_allclose(region, [0, 0, W, H])


def test_swap_happens_about_half_the_time_and_moves_regions_with_kinds():
    pairs = sample_many(ViewPairPolicy("obj-scene"), 2000)
    object_first = np.mean([p.kinds[0] == "object" for p in pairs])
    assert 0.45 < object_first < 0.55
    for p in pairs[:100]:
        scene_at = p.kinds.index("scene")
        np.testing.assert_allclose(p.regions[scene_at], [0, 0, W, H])


def test_object_region_is_chosen_uniformly_among_the_first_topk_usable_proposals():
    proposals = np.array([[10 * i, 10 * i, 10 * i + 200, 10 * i + 150] for i in range(20)], np.float32)
    # Unusable rows in front are skipped, not counted in the top k.
    proposals = np.concatenate([[[np.nan, 0, 10, 10], [5, 5, 5, 5], [700, 10, 800, 50]], proposals]).astype(np.float32)
    pairs = sample_many(ViewPairPolicy("obj-obj", topk=5, swap=False), 2000, proposals)
    chosen = [int(p.regions[0, 0]) // 10 for p in pairs]
    counts = np.bincount(chosen, minlength=20)
    assert counts[5:].sum() == 0
    np.testing.assert_allclose(counts[:5] / len(pairs), 0.2, atol=0.035)


@pytest.mark.parametrize(
    "proposals",
    [np.zeros((0, 4), np.float32), np.array([[np.nan, 1, 2, 3], [700, 500, 800, 600], [5, 5, 6, 6]], np.float32)],
    ids=["empty", "all-unusable"],
)
def test_falls_back_to_two_scene_views_without_usable_proposals(proposals):
    for name in POLICIES:
        pair = ViewPairPolicy(name).sample(W, H, proposals, np.random.default_rng(0))
        if name == "scene-scene":
            assert not pair.fallback
        else:
            assert pair.fallback
        assert pair.kinds == ("scene", "scene")
        np.testing.assert_allclose(pair.regions, [[0, 0, W, H]] * 2)


def test_same_seed_same_pairs_other_seed_other_pairs():
    policy = make_policy("obj-obj-shift")
    a, b, c = (sample_many(policy, 30, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x.crops, y.crops) and x.kinds == y.kinds for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.crops, y.crops) for x, y in zip(a, c, strict=True))


def test_dilated_region_is_the_object_dilated_by_delta_of_the_image_size():
    for pair in sample_many(ViewPairPolicy("obj-obj-dilate", delta=0.1, swap=False), 50):
        np.testing.assert_allclose(pair.regions[1], B.dilate(pair.regions[0], 0.1, W, H)[0])
        assert any(np.allclose(pair.regions[0], p) for p in PROPOSALS)


def test_shifted_region_is_the_object_moved_within_the_radius():
    proposals = np.array([[900, 900, 1000, 1000]], np.float32)
    for pair in sample_many(
        ViewPairPolicy("obj-obj-shift", shift_radius=(80, 100), swap=False), 50, proposals, 0, 2000, 2000
    ):
        d = pair.regions[1] - pair.regions[0]
        np.testing.assert_allclose(d[:2], d[2:], atol=1e-3)
        assert 80 - 1e-3 <= np.hypot(d[0], d[1]) <= 100 + 1e-3


def test_object_scale_auto_makes_the_smallest_object_crop_as_large_as_the_smallest_scene_crop():
    policy = ViewPairPolicy("obj-obj", swap=False)
    # A 400x400 object: lower bound 0.2 * W * H / 400^2 = 0.384 of the region.
    big = np.array([[100, 40, 500, 440]], np.float32)
    fractions = np.concatenate([B.area(p.crops) / B.area(p.regions) for p in sample_many(policy, 500, big)])
    assert fractions.min() >= 0.384 - 1e-3
    assert fractions.min() < 0.42
    # A 100x100 object is smaller than the smallest scene crop: the crop is the whole (square) object.
    small = np.array([[200, 200, 300, 300]], np.float32)
    for pair in sample_many(policy, 20, small):
        np.testing.assert_allclose(pair.crops, pair.regions, atol=1e-3)


def test_explicit_object_scale_is_used_as_given():
    policy = ViewPairPolicy("obj-obj", object_scale=(0.5, 0.6), swap=False)
    big = np.array([[100, 40, 500, 440]], np.float32)
    fractions = np.concatenate([B.area(p.crops) / B.area(p.regions) for p in sample_many(policy, 300, big)])
    assert fractions.min() >= 0.5 - 1e-3 and fractions.max() <= 0.6 + 1e-3


def test_scene_crops_follow_scene_scale_and_ratio():
    pairs = sample_many(ViewPairPolicy("scene-scene"), 500)
    crops = np.concatenate([p.crops for p in pairs])
    fractions = B.area(crops) / (W * H)
    ratios = (crops[:, 2] - crops[:, 0]) / (crops[:, 3] - crops[:, 1])
    assert fractions.min() >= 0.2 - 1e-3 and fractions.max() <= 1 + 1e-3
    assert ratios.min() >= 3 / 4 - 1e-3 and ratios.max() <= 4 / 3 + 1e-3


def test_min_box_size_grows_small_proposals():
    policy = ViewPairPolicy("obj-obj", min_box_size=224, swap=False)
    pair = policy.sample(W, H, np.array([[300, 200, 310, 210]], np.float32), np.random.default_rng(0))
    np.testing.assert_allclose(pair.regions[0], [193, 93, 417, 317])


def test_random_resized_crop_box_falls_back_to_a_centred_crop_in_ratio():
    region = np.array([0, 0, 100, 400], np.float32)  # ratio 1/4, outside [3/4, 4/3]
    crop = random_resized_crop_box(region, (1.0, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    np.testing.assert_allclose(crop, [0, 200 - 200 / 3, 100, 200 + 200 / 3], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"name": "nope"}, {"delta": -0.1}, {"topk": 0}, {"scene_scale": (0.5, 0.2)}, {"object_scale": (0.0, 1.0)}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ViewPairPolicy(**kwargs)
