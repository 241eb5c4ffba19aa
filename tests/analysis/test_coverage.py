import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from objcrop import cli
from objcrop.analysis.coverage import UnionArea, coverage, coverage_table, intersections
from objcrop.crops.policies import POLICIES, ViewPair, ViewPairPolicy
from objcrop.data.records import Records
from tests.conftest import SHARED_DATA, make_records, needs_shared_data

DATA = SHARED_DATA


class FixedPolicy:
    """Returns the same two crops for every sample, for exact answers."""

    name = "fixed"

    def __init__(self, crops, fallback: bool = False) -> None:
        self.crops = np.asarray(crops, dtype=np.float32).reshape(2, 4)
        self.fallback = fallback

    def sample(self, width, height, proposals, rng) -> ViewPair:
        return ViewPair(self.crops.copy(), self.crops.copy(), ("object", "scene"), self.fallback)


def random_scenes(n: int, rng: np.random.Generator, objects: int = 3, side=(15, 30), size=200) -> Records:
    """Images with a few small objects each (about 10% of the image in all)."""
    gts = []
    for _ in range(n):
        wh = rng.uniform(*side, size=(objects, 2))
        xy = rng.uniform(0, size - wh)
        gts.append(np.concatenate([xy, xy + wh], axis=1))
    return make_records(gts, size=(size, size))


def raster_covered(boxes, rects, width, height, scale=2) -> np.ndarray:
    """Brute force: covered area on a grid of 1/scale pixels (exact for coordinates on that grid)."""
    mask = np.zeros((height * scale, width * scale), bool)
    for x1, y1, x2, y2 in np.clip(np.round(np.asarray(boxes) * scale).astype(int), 0, None):
        mask[y1:y2, x1:x2] = True
    out = []
    for x1, y1, x2, y2 in np.round(np.asarray(rects) * scale).astype(int):
        out.append(mask[y1:y2, x1:x2].sum() / scale**2)
    return np.array(out)


def test_union_area_matches_raster_on_random_layouts():
    rng = np.random.default_rng(0)
    for _ in range(100):
        width, height = (int(v) for v in rng.integers(5, 50, size=2))
        n = int(rng.integers(0, 6))
        corners = np.sort(rng.integers(-10, 120, size=(n, 2, 2)) / 2, axis=1)  # half pixels, some outside
        boxes = np.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], axis=1)
        r = np.sort(rng.integers(0, 2 * min(width, height) + 1, size=(30, 2, 2)) / 2, axis=1)
        rects = np.stack([r[:, 0, 0], r[:, 0, 1], r[:, 1, 0], r[:, 1, 1]], axis=1)
        union = UnionArea(boxes, width, height)
        np.testing.assert_allclose(union.covered(rects), raster_covered(boxes, rects, width, height), atol=1e-6)
        assert union.total == pytest.approx(raster_covered(boxes, [[0, 0, width, height]], width, height)[0])


def test_union_area_counts_overlaps_once_and_ignores_empty_boxes():
    union = UnionArea([[0, 0, 10, 10], [5, 5, 15, 15], [3, 3, 3, 9]], 20, 20)
    assert union.num_boxes == 2
    assert union.total == pytest.approx(175.0)
    assert union.covered([[0, 0, 20, 20], [5, 5, 10, 10], [16, 16, 20, 20]]) == pytest.approx([175, 25, 0])


def test_union_area_rejects_empty_image():
    with pytest.raises(ValueError, match="positive"):
        UnionArea([[0, 0, 1, 1]], 0, 10)


def test_intersections():
    boxes, areas = intersections(np.array([[[0, 0, 10, 10], [5, 0, 20, 4]], [[0, 0, 1, 1], [2, 2, 3, 3]]]))
    np.testing.assert_allclose(boxes[0], [5, 0, 10, 4])
    np.testing.assert_allclose(areas, [20, 0])


@pytest.mark.parametrize(
    ("gt", "crops", "expected"),
    [
        ([[0, 0, 100, 100]], [[10, 10, 60, 60], [30, 30, 90, 90]], 1.0),  # GT covers the image
        ([[70, 0, 100, 100]], [[0, 0, 40, 40], [10, 10, 50, 60]], 0.0),  # GT disjoint from the overlap
        ([[0, 0, 50, 100]], [[0, 0, 100, 100], [20, 20, 80, 80]], 0.5),  # left half of the overlap
        ([[0, 0, 50, 50], [25, 25, 75, 75]], [[0, 0, 100, 100], [0, 0, 100, 100]], 4375 / 10000),
    ],
)
def test_coverage_exact_with_fixed_crops(gt, crops, expected):
    records = make_records([gt, gt])
    result = coverage(records, records, FixedPolicy(crops), pairs_per_image=7, bootstrap=50)
    assert result.mean_gt_fraction == pytest.approx(expected, abs=1e-6)
    assert (result.pairs, result.skipped_empty, result.images, result.fallbacks) == (14, 0, 2, 0)
    assert result.ci95 == pytest.approx((expected, expected), abs=1e-6)


def test_pairs_are_pooled_over_images():
    records = make_records([[[0, 0, 100, 100]], [[0, 0, 25, 100]], [[0, 0, 50, 100]]])
    result = coverage(records, records, FixedPolicy([[0, 0, 100, 100], [0, 0, 100, 100]]), pairs_per_image=3)
    assert result.mean_gt_fraction == pytest.approx((1 + 0.25 + 0.5) / 3)
    np.testing.assert_array_equal(result.image_index, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    lo, hi = result.ci95
    assert 0.25 <= lo <= result.mean_gt_fraction <= hi <= 1.0


def test_empty_intersections_are_counted_and_excluded():
    records = make_records([[[0, 0, 100, 100]]] * 3)
    result = coverage(records, records, FixedPolicy([[0, 0, 40, 40], [50, 50, 90, 90]], fallback=True), 4)
    assert (result.pairs, result.skipped_empty, result.fallbacks) == (0, 12, 12)
    assert math.isnan(result.mean_gt_fraction) and all(math.isnan(v) for v in result.ci95)
    summary = result.to_dict()
    assert summary["mean_gt_fraction"] is None and summary["ci95"] == [None, None]
    json.dumps(summary)  # NaN never reaches the JSON


def test_images_without_gt_are_skipped_and_counted():
    records = make_records([[[0, 0, 50, 100]], [], [[0, 0, 10, 0]]])  # the last box is empty
    result = coverage(records, records, FixedPolicy([[0, 0, 100, 100], [0, 0, 100, 100]]), 5)
    assert (result.images, result.images_without_gt, result.pairs) == (1, 2, 5)
    assert result.mean_gt_fraction == pytest.approx(0.5)


def test_same_seed_same_result_and_validation():
    records = random_scenes(10, np.random.default_rng(1))
    # dilate-dilate: the share varies from pair to pair (an object crop's intersection lies inside its object,
    # so obj-* policies give 1 whatever the seed).
    policy = ViewPairPolicy("dilate-dilate")
    a = coverage(records, records, policy, pairs_per_image=5, seed=3)
    b = coverage(records, records, policy, pairs_per_image=5, seed=3)
    assert a.to_dict() == b.to_dict()
    np.testing.assert_array_equal(a.fractions, b.fractions)
    other = coverage(records, records, policy, pairs_per_image=5, seed=4)
    assert not np.array_equal(other.fractions, a.fractions) and other.ci95 != a.ci95
    assert coverage(records, records, policy, pairs_per_image=1).pairs_per_image == 1  # one pair is enough
    with pytest.raises(ValueError, match="pairs_per_image"):
        coverage(records, records, policy, pairs_per_image=0)


def test_coverage_defaults_and_its_bar_and_log(capsys, caplog):
    records = random_scenes(12, np.random.default_rng(1))  # enough images for distinct resampled ratios
    policy = ViewPairPolicy("dilate-dilate")
    with caplog.at_level("INFO", logger="objcrop.analysis.coverage"):
        default = coverage(records, records, policy)
    assert capsys.readouterr().err == ""  # no bar unless asked
    explicit = coverage(records, records, policy, pairs_per_image=50, seed=0, bootstrap=1000)
    assert default.to_dict() == explicit.to_dict() and default.pairs_per_image == 50 and default.seed == 0
    assert default.ci95 == explicit.ci95  # unrounded: 1000 resamples, not some other number
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("coverage dilate-dilate")]
    pairs, images, seconds = re.match(
        r"coverage dilate-dilate: (\d+) pairs on (\d+) images in ([\d.]+) s", line
    ).groups()
    assert (int(pairs), int(images)) == (600, 12) and float(seconds) < 600
    coverage(records, records, policy, pairs_per_image=2, progress=True)
    bar = capsys.readouterr().err
    assert "coverage dilate-dilate" in bar and "12/12" in bar and "img/s" in bar


def test_ci_contains_the_mean_and_shrinks_with_more_images():
    rng = np.random.default_rng(2)
    policy = ViewPairPolicy("dilate-dilate")
    widths = []
    for n in (12, 192):
        records = random_scenes(n, rng)
        result = coverage(records, records, policy, pairs_per_image=4, seed=0, bootstrap=500)
        lo, hi = result.ci95
        assert lo < result.mean_gt_fraction < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(16) in theory


def test_object_policies_cover_more_objects_than_scene_crops():
    records = random_scenes(30, np.random.default_rng(3))
    means = {
        name: coverage(records, records, ViewPairPolicy(name), pairs_per_image=10, seed=0).mean_gt_fraction
        for name in ("scene-scene", "dilate-dilate", "obj-scene", "obj-obj-dilate")
    }
    assert means["scene-scene"] == pytest.approx(0.1, abs=0.05)  # objects are ~10% of each image
    assert means["dilate-dilate"] > means["scene-scene"] + 0.1
    # With GT proposals an object crop lies inside a GT box, so whatever it shares is object.
    assert means["obj-scene"] == pytest.approx(1.0)
    assert means["obj-obj-dilate"] == pytest.approx(1.0)


def test_object_crops_grown_to_a_min_size_leave_the_object():
    records = random_scenes(20, np.random.default_rng(5))
    grown = ViewPairPolicy("obj-obj-dilate", min_box_size=120)
    result = coverage(records, records, grown, pairs_per_image=10, seed=0)
    scene = coverage(records, records, ViewPairPolicy("scene-scene"), pairs_per_image=10, seed=0)
    assert scene.ci95[1] < result.mean_gt_fraction < 0.9


def test_coverage_table_lists_every_policy():
    records = random_scenes(5, np.random.default_rng(4))
    results = [coverage(records, records, ViewPairPolicy(n), pairs_per_image=4, bootstrap=20) for n in POLICIES]
    lines = coverage_table(results).splitlines()
    assert len(lines) == 2 + len(POLICIES)
    for name, line in zip(POLICIES, lines[2:], strict=True):
        assert line.startswith(name)


def write_coco(root: Path, n: int = 3) -> tuple[Path, Path]:
    """A tiny COCO dataset: ``n`` 64x48 images with two boxes each (the last image has none)."""
    images = root / "images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(n):
        name = f"{i:03d}.jpg"
        Image.new("RGB", (64, 48), (40 * i, 100, 200)).save(images / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": 64, "height": 48})
        if i < n - 1:
            for j, bbox in enumerate(([4, 4, 20, 16], [30, 20, 24, 20])):
                ann = {"id": 10 * i + j + 1, "image_id": i + 1, "category_id": 1, "bbox": bbox}
                coco["annotations"].append(ann | {"area": bbox[2] * bbox[3], "iscrowd": 0})
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(coco))
    return annotations, images


def test_cli_json_one_object_per_policy(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    base = ["analyze", "coverage", "--format", "coco", "--annotations", str(annotations), "--images", str(images)]
    base += ["--proposals", "gt", "--pairs-per-image", "6", "--seed", "0", "--json"]
    assert cli.main([*base, "--policy", "obj-scene"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert {"policy", "mean_gt_fraction", "ci95", "pairs", "skipped_empty"} <= row.keys()
    assert row["policy"] == "obj-scene" and len(row["ci95"]) == 2
    assert row["pairs"] + row["skipped_empty"] == 12 and row["images_without_gt"] == 1
    assert 0 <= row["mean_gt_fraction"] <= 1

    assert cli.main([*base, "--policy", "scene-scene", "--policy", "obj-obj-dilate", "--delta", "0.2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["policy"] for r in rows] == ["scene-scene", "obj-obj-dilate"]


def test_cli_table_defaults_to_every_policy(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    argv = ["analyze", "coverage", "--format", "coco", "--annotations", str(annotations), "--images", str(images)]
    assert cli.main([*argv, "--proposals", "gt", "--pairs-per-image", "3", "--bootstrap", "10"]) == 0
    out = capsys.readouterr().out
    for name in POLICIES:
        assert name in out
    # Each policy's resolved object-crop scale is printed, calibrated on the proposals given (here GT).
    assert "obj-obj-dilate: object crop scale: paper, S_min = 0.2 / " in out


def test_cli_out_replaces_only_result_files(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    out = tmp_path / "coverage.json"
    argv = ["analyze", "coverage", "--format", "coco", "--annotations", str(annotations), "--images", str(images)]
    argv += ["--proposals", "gt", "--policy", "scene-scene", "--pairs-per-image", "2", "--bootstrap", "5"]
    argv += ["--out", str(out)]
    out.write_text('{"kind": "coverage", "my": "notes"}')  # a JSON object, but not a result file
    assert cli.main(argv) == 2
    assert f"{out} was not written by objcrop" in capsys.readouterr().err
    assert out.read_text() == '{"kind": "coverage", "my": "notes"}'
    out.unlink()
    assert cli.main(argv) == 0
    first = json.loads(out.read_text())
    out.write_text(json.dumps(first | {"date": "an older run"}))  # objcrop's own result file: replaced
    assert cli.main(argv) == 0
    again = json.loads(out.read_text())
    assert again["kind"] == "coverage" and again["date"] != "an older run"


@needs_shared_data("coco128/annotations", "coco128/train2017")
def test_coco128_object_crops_overlap_on_objects():
    from objcrop.data.readers import load_records
    from objcrop.proposals import open_proposals

    root = DATA / "coco128"
    records = load_records(
        "coco", annotations=str(root / "annotations" / "instances_train2017.json"), images=str(root / "train2017")
    )
    store = open_proposals("gt", records)
    scene = coverage(records, store, ViewPairPolicy("scene-scene"), pairs_per_image=3, bootstrap=100)
    dilate = coverage(records, store, ViewPairPolicy("obj-obj-dilate"), pairs_per_image=3, bootstrap=100)
    assert dilate.images_without_gt == scene.images_without_gt == 2
    assert dilate.mean_gt_fraction > scene.ci95[1]


# ---------------------------------------------------------------- pinned details (mutation testing, docs/testing.md)


def _result(policy="obj-obj-dilate", mean=0.5, ci=(0.25, 0.75), pairs=12, empty=3, fallbacks=1, images=4, no_gt=2):
    from objcrop.analysis.coverage import CoverageResult

    return CoverageResult(policy, mean, ci, pairs, empty, fallbacks, images, no_gt, pairs_per_image=5, seed=7)


def test_coverage_table_is_aligned_text_with_three_decimals():
    table = coverage_table([_result(), _result("scene-scene", 0.12345, (0.1, 0.2), 1000, 0, 0, 250, 0)])
    assert table.splitlines() == [
        "policy          GT fraction          95% CI  pairs  empty  fallbacks  images  no GT",
        "--------------  -----------  --------------  -----  -----  ---------  ------  -----",
        "obj-obj-dilate        0.500  [0.250, 0.750]     12      3          1       4      2",
        "scene-scene           0.123  [0.100, 0.200]   1000      0          0     250      0",
    ]


def test_coverage_table_of_no_results_is_its_header():
    assert coverage_table([]).splitlines() == [
        "policy  GT fraction  95% CI  pairs  empty  fallbacks  images  no GT",
        "------  -----------  ------  -----  -----  ---------  ------  -----",
    ]


def test_to_dict_holds_every_count_and_the_settings():
    assert _result().to_dict() == {
        "policy": "obj-obj-dilate",
        "mean_gt_fraction": 0.5,
        "ci95": [0.25, 0.75],
        "pairs": 12,
        "skipped_empty": 3,
        "fallbacks": 1,
        "images": 4,
        "images_without_gt": 2,
        "pairs_per_image": 5,
        "seed": 7,
    }


def test_bootstrap_is_of_the_pooled_ratio_and_has_the_binomial_width():
    from objcrop.analysis.coverage import _bootstrap_ci

    # 400 images, each one pair, half fully object: the mean's 95 % interval is 0.5 +- 1.96 sqrt(0.25 / 400).
    sums, counts = np.tile([1.0, 0.0], 200), np.ones(400, dtype=np.int64)
    lo, hi = _bootstrap_ci(sums, counts, 4000, np.random.default_rng(0))
    half = 1.96 * math.sqrt(0.25 / 400)
    assert lo == pytest.approx(0.5 - half, abs=0.006) and hi == pytest.approx(0.5 + half, abs=0.006)
    # Pairs weigh the same, not images: one image of 1 pair at 1.0 and one of 9 pairs at 0 pool to 0.1.
    lo, hi = _bootstrap_ci(np.array([1.0, 0.0]), np.array([1, 9]), 2000, np.random.default_rng(0))
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0) and lo < 0.1 < hi


def test_bootstrap_drops_resamples_without_pairs_and_refuses_to_make_one_up():
    from objcrop.analysis.coverage import _bootstrap_ci

    # Image 0 has no non-empty pair: a resample of it alone has no mean and is left out, not counted as 0,
    # and quietly (0 / 0 is expected there).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = _bootstrap_ci(np.array([0.0, 3.0]), np.array([0, 3]), 500, np.random.default_rng(1))
    assert (lo, hi) == (1.0, 1.0)
    # One resample is an interval too: its only value at both ends.
    lo, hi = _bootstrap_ci(np.array([1.0, 3.0]), np.array([2, 4]), 1, np.random.default_rng(1))
    assert lo == hi and lo in (0.5, 0.75, 2 / 3)
    for resamples, counts in ((0, [1, 1]), (-1, [1, 1]), (100, [0, 0])):
        assert all(
            math.isnan(v) for v in _bootstrap_ci(np.ones(2), np.array(counts), resamples, np.random.default_rng())
        )


def test_bootstrap_chunks_give_every_resample():
    from objcrop.analysis.coverage import _bootstrap_ci

    class CountingRng:
        """Draws image 0 every time and records the shape of each draw."""

        def __init__(self):
            self.sizes = []

        def integers(self, low, high, size):
            self.sizes.append((low, high, size))
            return np.zeros(size, dtype=np.int64)

    # Many images make the chunk of resamples (about 4M indices) smaller than the count: all are still drawn.
    n = (1 << 21) + 1  # chunk = 1 resample
    rng = CountingRng()
    assert _bootstrap_ci(np.ones(n), np.ones(n, dtype=np.int64), 3, rng) == (1.0, 1.0)
    assert rng.sizes == [(0, n, (1, n))] * 3
    rng = CountingRng()
    _bootstrap_ci(np.ones(4), np.ones(4, dtype=np.int64), 10, rng)
    assert rng.sizes == [(0, 4, (10, 4))]  # a small dataset: one draw of every resample


def test_union_area_clips_rectangles_and_boxes_to_the_image():
    union = UnionArea([[-5, -5, 10, 10], [15, 15, 40, 40]], 20, 20)  # both boxes partly outside
    assert union.num_boxes == 2 and union.total == pytest.approx(100 + 25)
    assert union.covered([[-10, -10, 5, 5], [18, 18, 30, 30], [-10, -10, 30, 30], [5, 0, 5, 20]]) == pytest.approx(
        [25, 4, 125, 0]
    )
    assert union.covered([[10, 10, 15, 15]]) == pytest.approx([0])  # between the boxes
    assert UnionArea(np.zeros((0, 4)), 8, 6).covered([[0, 0, 8, 6]]) == pytest.approx([0])


def test_union_area_interpolates_inside_a_cell():
    union = UnionArea([[2, 0, 6, 10]], 10, 10)  # one box, cells 0-2, 2-6 and 6-10 wide
    assert union.covered([[0, 0, 3, 5], [4, 2, 5, 3], [1, 1, 9, 9], [2.5, 0, 2.75, 10]]) == pytest.approx(
        [5, 1, 32, 2.5]
    )


def test_coverage_calibrates_a_paper_policy_and_records_its_settings():
    records = random_scenes(6, np.random.default_rng(8))
    policy = ViewPairPolicy("obj-obj-dilate", object_scale="paper")
    assert policy.calibration is None
    result = coverage(records, records, policy, pairs_per_image=3, seed=5, bootstrap=0)
    assert policy.calibration is not None and policy.calibration["images"] == 6
    assert (result.pairs_per_image, result.seed, result.images, result.pairs) == (3, 5, 6, 18)
    assert result.fractions.dtype == np.float32 and result.image_index.dtype == np.int64
    assert all(math.isnan(v) for v in result.ci95)  # bootstrap=0: no interval
    other = coverage(records, records, ViewPairPolicy("obj-obj-dilate", object_scale="paper"), 3, seed=6, bootstrap=0)
    assert not np.array_equal(other.fractions, result.fractions) or other.to_dict() != result.to_dict()


def test_a_dataset_without_any_ground_truth_gives_empty_typed_results_quietly():
    records = make_records([[], []])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = coverage(records, records, FixedPolicy([[0, 0, 100, 100], [0, 0, 100, 100]]), 3)
    assert (result.pairs, result.images, result.images_without_gt) == (0, 0, 2)
    assert math.isnan(result.mean_gt_fraction)
    assert (result.fractions.dtype, result.fractions.shape) == (np.float32, (0,))
    assert (result.image_index.dtype, result.image_index.shape) == (np.int64, (0,))


def test_sub_pixel_intersections_and_boxes_count():
    records = make_records([[[0, 0, 100, 100]]])
    result = coverage(records, records, FixedPolicy([[0, 0, 10, 10], [9.5, 9, 20, 20]]), 2)  # 0.5 x 1 px
    assert (result.pairs, result.skipped_empty) == (2, 0) and result.mean_gt_fraction == pytest.approx(1.0)
    union = UnionArea(np.array([[2, 2, 3, 2.5]]), 10, 10)  # a 1 x 0.5 px box is a box
    assert union.num_boxes == 1 and union.covered(np.array([[0, 0, 10, 10]]))[0] == pytest.approx(0.5)


def test_union_area_accepts_a_one_pixel_image_and_refuses_a_flat_one():
    assert UnionArea(np.array([[0, 0, 1, 1]]), 1, 1).covered(np.array([[0, 0, 1, 1]]))[0] == pytest.approx(1.0)
    for width, height in ((1, 0), (0, 1)):
        with pytest.raises(ValueError):
            UnionArea(np.zeros((0, 4)), width, height)


def test_union_area_of_rectangles_that_start_before_the_first_box():
    union = UnionArea(np.array([[5, 5, 10, 10]]), 20, 20)
    got = union.covered(np.array([[0, 0, 20, 20], [0, 0, 0.5, 20], [0, 0, 7, 7], [0.25, 0.25, 5, 5]]))
    np.testing.assert_allclose(got, [25, 0, 4, 0])
    near_the_edge = UnionArea(np.array([[0.5, 0.25, 5, 5]]), 20, 20)  # edges inside the image's first pixel
    np.testing.assert_allclose(near_the_edge.covered(np.array([[0, 0, 5, 5], [0, 0, 2, 2]])), [4.5 * 4.75, 1.5 * 1.75])


def test_bootstrap_interval_is_the_2_5_and_97_5_percentiles_of_the_resampled_ratio():
    from objcrop.analysis.coverage import _bootstrap_ci

    sums, counts = np.array([0.2, 1.5, 3.0, 0.1, 2.2]), np.array([1, 2, 4, 1, 3])
    got = _bootstrap_ci(sums, counts, 300, np.random.default_rng(5))
    idx = np.random.default_rng(5).integers(0, 5, size=(300, 5))  # one chunk: the same draws
    expected = np.percentile(sums[idx].sum(1) / counts[idx].sum(1), [2.5, 97.5])
    assert got == pytest.approx(tuple(expected))
