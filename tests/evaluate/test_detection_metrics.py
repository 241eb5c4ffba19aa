"""COCO AP glue: ground truth from records or the original JSON, and AP checked against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from objcrop.data.coco import read_coco
from objcrop.data.records import Record, Records
from objcrop.evaluate.detection_metrics import (
    METRICS,
    Detections,
    coco_evaluate,
    ground_truth_from_json,
    ground_truth_from_records,
)


def _records(boxes_per_image: list[list[list[float]]], labels_per_image: list[list[int]], names=("cat", "dog")):
    recs = [
        Record(f"{i}.jpg", 400, 300, np.array(b, np.float32).reshape(-1, 4), np.array(lab, np.int32), image_id=10 + i)
        for i, (b, lab) in enumerate(zip(boxes_per_image, labels_per_image, strict=True))
    ]
    return Records.from_records(recs, list(names))


def _as_detections(records: Records, score: float = 0.9) -> Detections:
    counts = np.diff(records.box_offsets)
    return Detections(
        np.repeat(records.image_ids, counts),
        records.boxes.copy(),
        np.full(len(records.boxes), score, np.float32),
        records.box_labels.astype(np.int64),
    )


# Small (< 32^2), medium and large (> 96^2) boxes of both classes, one image without boxes.
BOXES = [[[10, 10, 30, 25], [50, 60, 120, 140]], [[0, 0, 300, 250]], []]
LABELS = [[0, 1], [1], []]


def test_detections_equal_to_ground_truth_give_ap_one():
    records = _records(BOXES, LABELS)
    metrics = coco_evaluate(ground_truth_from_records(records), _as_detections(records))
    assert metrics == pytest.approx({name: 1.0 for name in METRICS})


def test_no_detection_gives_zero_and_minus_one_without_objects_of_a_size():
    records = _records([[[50, 60, 120, 140]]], [[1]])
    metrics = coco_evaluate(ground_truth_from_records(records), Detections.empty())
    assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": -1.0, "APm": 0.0, "APl": -1.0}


# COCO's AP of a class whose detections find half its objects, all ranked above any false positive: precision 1
# at the 51 recall points 0, 0.01, ..., 0.5 of the 101, and 0 beyond.
HALF_FOUND = 51 / 101


def test_shifted_and_wrong_class_detections_give_the_hand_computed_ap():
    records = _records(BOXES, LABELS)
    dets = _as_detections(records)
    dets.boxes[0] += np.float32(8)  # small cat moved by 8 px: IoU 84 / 516 = 0.16, a miss at every threshold
    dets.labels[1] = 0  # medium dog called a cat: another false cat, and the medium dog is missed
    metrics = coco_evaluate(ground_truth_from_records(records), dets)
    # cat: AP 0; dog: the large one of its two found, AP HALF_FOUND; the mean over the two classes.
    # Per size only the classes with an object of that size count: small: the cat (0); medium: the dog, whose
    # only detection matches the large dog (ignored at this size), so 0; large: the dog, found (1).
    ap = HALF_FOUND / 2
    assert metrics == pytest.approx({"AP": ap, "AP50": ap, "AP75": ap, "APs": 0.0, "APm": 0.0, "APl": 1.0})


def test_a_box_found_at_iou_062_counts_at_thresholds_050_to_060_only():
    records = _records(BOXES, LABELS)
    dets = _as_detections(records)
    dets.boxes[2] += np.float32([70, 0, 70, 0])  # the large dog moved 70 px right: IoU 230 / 370 = 0.62
    dets.scores[2] = 0.8  # ranked below the medium dog (no tie for the ranking to break)
    metrics = coco_evaluate(ground_truth_from_records(records), dets)
    # AP averages the thresholds 0.50, 0.55, ..., 0.95: the large dog is a hit at 3 of the 10 (dog AP 1), a
    # false positive after the found medium dog at the other 7 (dog AP HALF_FOUND). The cat is always found.
    dog = (3 * 1.0 + 7 * HALF_FOUND) / 10
    expected = {"AP": (1.0 + dog) / 2, "AP50": 1.0, "AP75": (1.0 + HALF_FOUND) / 2, "APs": 1.0, "APm": 1.0}
    assert metrics == pytest.approx({**expected, "APl": 0.3})


def test_a_false_positive_lowers_the_ap_of_its_own_size_only():
    records = _records([[[50, 60, 120, 140]]], [[1]])  # one medium dog (70 x 80)
    dets = Detections(
        np.array([10, 10]),
        np.array([[50, 60, 120, 140], [200, 100, 290, 190]], np.float32),  # the dog; a 90 x 90 box (medium)
        np.array([0.8, 0.9], np.float32),  # the false positive ranked first: precision 1/2 at recall 1
        np.array([1, 1]),
    )
    metrics = coco_evaluate(ground_truth_from_records(records), dets)
    assert metrics == pytest.approx({"AP": 0.5, "AP50": 0.5, "AP75": 0.5, "APs": -1.0, "APm": 0.5, "APl": -1.0})


def test_test_classes_are_matched_by_name_and_unknown_ones_rejected():
    records = _records(BOXES, LABELS)
    gt = ground_truth_from_records(records, class_names=["dog", "bird", "cat"])
    dets = _as_detections(records)
    dets.labels = np.array([2, 0, 0])  # cat -> 2, dog -> 0 in the detector's classes
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown to the detector"):
        ground_truth_from_records(records, class_names=["dog"])


def test_original_json_ignores_crowd_and_maps_sparse_category_ids(tmp_path):
    ann = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [10, 10, 50, 40], "area": 1500.0, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [100, 20, 60, 60], "area": 3000.0, "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [0, 60, 200, 40], "area": 8000.0, "iscrowd": 1},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    records = read_coco(path, tmp_path, check_images=False)  # annotations only: no image files
    dets = _as_detections(records)
    crowd_hit = Detections(
        np.array([7]), np.array([[0, 60, 200, 100]], np.float32), np.array([0.99], np.float32), np.array([0])
    )
    gt = ground_truth_from_json(path, records.class_names)
    assert coco_evaluate(gt, Detections.concatenate([dets, crowd_hit]))["AP"] == pytest.approx(1.0)
    # Scored against the boxes as read, the crowd region is gone and that detection is a false cat ranked above
    # the cat (IoU 0.12 with it): cat AP 1/2, dog AP 1.
    as_read = coco_evaluate(ground_truth_from_records(records), Detections.concatenate([dets, crowd_hit]))
    assert as_read["AP"] == pytest.approx(0.75)


def test_detection_on_an_unknown_image_is_an_error():
    records = _records(BOXES, LABELS)
    stray = Detections(
        np.array([999]), np.zeros((1, 4), np.float32) + [0, 0, 5, 5], np.ones(1, np.float32), np.zeros(1, np.int64)
    )
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(ground_truth_from_records(records), stray)


def _layout(d: Detections, k: int) -> bool:
    """Whether ``d`` holds ``k`` detections as documented: int64 ids and labels, float32 boxes and scores."""
    fields = [(f.dtype, f.shape) for f in (d.image_ids, d.boxes, d.scores, d.labels)]
    return fields == [(np.int64, (k,)), (np.float32, (k, 4)), (np.float32, (k,)), (np.int64, (k,))]


def test_empty_and_concatenated_detections_have_the_documented_dtypes_and_shapes():
    empty = Detections.empty()
    assert _layout(empty, 0) and len(empty) == 0
    part = Detections(np.array([3], np.int32), np.array([[1, 2, 3, 4]]), np.array([0.5]), np.array([1], np.int32))
    joined = Detections.concatenate([part, Detections.empty(), part])
    assert _layout(joined, 2)
    assert joined.image_ids.tolist() == [3, 3] and joined.boxes[1].tolist() == [1, 2, 3, 4] and len(joined) == 2
    nothing = Detections.concatenate([])
    assert nothing.boxes.shape == (0, 4) and nothing.labels.dtype == np.int64


def test_class_map_and_xywh_helpers():
    from objcrop.evaluate.detection_metrics import _class_map, _xywh

    mapped = _class_map(["dog", "bird", "cat"], ["cat", "dog"])
    assert mapped.dtype == np.int64 and mapped.tolist() == [1, -1, 0]
    assert _class_map([], ["cat"]).dtype == np.int64  # an empty list too: it indexes arrays
    xywh = _xywh(np.array([10.25, 20.5, 30.75, 60.0], np.float32))  # one flat box
    assert xywh.dtype == np.float64 and xywh.tolist() == [[10.25, 20.5, 20.5, 39.5]]
    assert _xywh(np.array([[0, 0, 3, 2]], np.int32)).dtype == np.float64


def test_evaluation_prints_nothing(capsys):
    records = _records(BOXES, LABELS)
    coco_evaluate(ground_truth_from_records(records), _as_detections(records))
    assert capsys.readouterr().out == ""


def test_the_ground_truth_is_a_coco_dataset_of_the_records():
    records = _records(BOXES, LABELS)
    gt = ground_truth_from_records(records)
    assert gt.category_ids.dtype == np.int64 and gt.category_ids.tolist() == [1, 2]
    assert gt.coco.cats == {1: {"id": 1, "name": "cat"}, 2: {"id": 2, "name": "dog"}}
    assert gt.coco.imgs[10] == {"id": 10, "width": 400, "height": 300, "file_name": "0.jpg"}
    assert sorted(gt.coco.imgs) == [10, 11, 12]
    assert gt.coco.anns[2] == {
        "id": 2,
        "image_id": 10,
        "category_id": 2,
        "bbox": [50.0, 60.0, 70.0, 80.0],
        "area": 5600.0,
        "iscrowd": 0,
    }
    assert sorted(gt.coco.anns) == [1, 2, 3]


def test_records_without_boxes_give_an_empty_ground_truth():
    records = _records([[], []], [[], []])
    gt = ground_truth_from_records(records)
    assert gt.coco.anns == {} and sorted(gt.coco.imgs) == [10, 11]
    assert coco_evaluate(gt, Detections.empty()) == {name: -1.0 for name in METRICS}


def test_a_wide_object_is_sized_by_its_area_not_its_height():
    # 120 x 20 = 2400 px: medium (32^2 .. 96^2), although its height alone squared (400) is small.
    records = _records([[[10, 10, 130, 30]]], [[0]])
    metrics = coco_evaluate(ground_truth_from_records(records), _as_detections(records))
    assert metrics == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": -1.0, "APm": 1.0, "APl": -1.0})


def test_a_wide_false_positive_counts_in_the_size_range_of_its_area():
    records = _records([[[50, 60, 120, 140]]], [[1]])  # one medium dog (70 x 80)
    dets = Detections(
        np.array([10, 10]),
        np.array([[50, 60, 120, 140], [200, 200, 400, 220]], np.float32),  # the dog; a 200 x 20 box: 4000 px, medium
        np.array([0.8, 0.9], np.float32),  # the false positive ranked first
        np.array([1, 1]),
    )
    metrics = coco_evaluate(ground_truth_from_records(records), dets)
    assert metrics["APm"] == pytest.approx(0.5) and metrics["AP"] == pytest.approx(0.5)


def test_a_duplicate_detection_of_a_found_object_is_a_false_positive():
    records = _records([[[0, 0, 100, 100], [200, 100, 300, 200]]], [[0, 0]])  # two large cats
    dets = Detections(
        np.array([10, 10, 10]),
        np.array([[0, 0, 100, 100], [0, 0, 100, 100], [200, 100, 300, 200]], np.float32),
        np.array([0.9, 0.8, 0.7], np.float32),  # hit, the same cat again, the other cat
        np.array([0, 0, 0]),
    )
    # Precision 1 up to recall 0.5 (51 of the 101 points), 2/3 from there to recall 1 (50 points).
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert coco_evaluate(ground_truth_from_records(records), dets)["AP"] == pytest.approx(expected)


def test_only_the_images_named_are_scored():
    records = _records([[[0, 0, 100, 100]], [[0, 0, 100, 100]]], [[0], [0]])
    dets = _as_detections(records)
    on_first = Detections(dets.image_ids[:1], dets.boxes[:1], dets.scores[:1], dets.labels[:1])
    gt = ground_truth_from_records(records)
    assert coco_evaluate(gt, on_first)["AP"] == pytest.approx(HALF_FOUND)  # the second cat is missed
    assert coco_evaluate(gt, on_first, image_ids=np.array([10]))["AP"] == pytest.approx(1.0)


def test_detections_with_untyped_empty_labels_score_zero():
    records = _records([[[0, 0, 100, 100]]], [[0]])
    nothing = Detections(np.array([]), np.zeros((0, 4), np.float32), np.array([]), np.array([]))  # float64 arrays
    assert coco_evaluate(ground_truth_from_records(records), nothing)["AP"] == 0.0


def test_error_messages_name_what_is_wrong():
    names = [f"class{i:02d}" for i in range(12)]
    records = _records([[[0, 0, 5, 5]] * 12], [list(range(12))], names=names)
    with pytest.raises(ValueError) as err:
        ground_truth_from_records(records, class_names=["class00"])
    assert str(err.value) == f"test classes unknown to the detector: {names[1:11]}"  # the first ten
    stray = Detections(np.arange(100, 106), np.zeros((6, 4), np.float32) + [0, 0, 5, 5], np.ones(6), np.zeros(6))
    with pytest.raises(ValueError) as err:
        coco_evaluate(ground_truth_from_records(_records(BOXES, LABELS)), stray)
    assert str(err.value) == "detections on images that are not in the ground truth: [100, 101, 102, 103, 104]"


def _write_json(tmp_path, categories) -> str:
    ann = {"images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}], "annotations": []}
    if categories is not None:
        ann["categories"] = categories
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    return str(path)


def test_original_json_categories_are_matched_by_name_or_id(tmp_path):
    cats = [{"id": 9, "name": "dog"}, {"id": 0, "name": "cat"}, {"id": 4}]  # id 0, and one without a name
    gt = ground_truth_from_json(_write_json(tmp_path, cats), ["cat", "dog", "bird", "4"])
    assert gt.category_ids.dtype == np.int64 and gt.category_ids.tolist() == [0, 9, -1, 4]
    assert ground_truth_from_json(_write_json(tmp_path, None), ["cat", "dog"]).category_ids.tolist() == [-1, -1]


def test_a_category_with_id_zero_is_scored(tmp_path):
    ann = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}],
        "categories": [{"id": 0, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 0, "bbox": [10, 10, 50, 40], "area": 2000.0, "iscrowd": 0}
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    dets = Detections(np.array([7]), np.array([[10, 10, 60, 50]], np.float32), np.ones(1, np.float32), np.array([0]))
    assert coco_evaluate(ground_truth_from_json(path, ["cat"]), dets)["AP"] == pytest.approx(1.0)


def test_original_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as err:
        ground_truth_from_json(missing, ["cat"])
    assert (err.value.errno, err.value.strerror, err.value.filename) == (
        2,
        "COCO annotation file not found",
        str(missing),
    )
    path = _write_json(tmp_path, [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}])
    with pytest.raises(ValueError) as err:
        ground_truth_from_json(path, ["cat"])
    assert str(err.value) == f"{path}: category names are not unique"
