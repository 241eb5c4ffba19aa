"""Metrics and targets: mAP by hand, top-1, chance, the task's labels, the class check, a torch-free import."""

import math
import subprocess
import sys

import numpy as np
import pytest

from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.evaluate.metrics import (
    TASKS,
    chance_level,
    check_same_classes,
    labels_for_task,
    mean_average_precision,
    metric_name,
    score_predictions,
    top1_accuracy,
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, 20, size=32, test_fraction=0.3, progress=False)
    train = load_records("coco", annotations=out / "train.json", images=out / "images")
    test = load_records("coco", annotations=out / "test.json", images=out / "images")
    return train, test


def test_map_matches_hand_computed_average_precision_and_skips_classes_without_positives():
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.5], [0.8, 0.7, 0.1], [0.3, 0.6, 0.2], [0.1, 0.1, 0.9]])
    # Class 0 ranks pos, neg, pos: AP = (1/1 + 2/3) / 2. Class 1 ranks both positives first: AP = 1.
    value, evaluated, skipped = mean_average_precision(targets, scores)
    assert value == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)
    assert (evaluated, skipped) == (2, 1)
    value, evaluated, skipped = mean_average_precision(np.zeros((3, 2)), np.ones((3, 2)))
    assert math.isnan(value) and (evaluated, skipped) == (0, 2)
    with pytest.raises(ValueError, match="must both be"):
        mean_average_precision(targets, scores[:, :2])


def test_top1_and_chance():
    assert top1_accuracy(np.array([0, 2, 1, 1]), np.eye(3)[[0, 2, 0, 1]]) == 75.0
    assert math.isnan(top1_accuracy(np.zeros(0, int), np.zeros((0, 3))))
    assert chance_level("single", np.array([0, 1, 1, 1])) == 75.0
    # Mean prevalence of the classes that have a positive (the third has none).
    assert chance_level("multi", np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])) == pytest.approx(37.5)


def test_score_predictions_dispatches_on_the_task():
    labels = np.array([0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    value, evaluated, skipped = score_predictions("single", labels, scores)
    assert value == pytest.approx(200 / 3) and (evaluated, skipped) == (2, 0)
    multi = np.eye(2)[labels]
    assert score_predictions("multi", multi, scores) == mean_average_precision(multi, scores)
    assert (metric_name("multi"), metric_name("single")) == ("mAP", "top1")
    for bad in (lambda: score_predictions("top5", labels, scores), lambda: metric_name("top5")):
        with pytest.raises(ValueError, match="unknown task 'top5'; choose one of multi, single"):
            bad()
    assert TASKS == ("multi", "single")


def test_labels_for_task(scenes):
    train, _ = scenes
    multi = labels_for_task(train, "multi")
    assert multi.shape == (len(train), 10) and multi.dtype == np.float32
    assert np.array_equal(multi, train.label_matrix())
    with pytest.raises(ValueError, match="exactly one label"):
        labels_for_task(train, "single")  # the scenes have 2-6 objects
    with pytest.raises(ValueError, match="unknown task"):
        labels_for_task(train, "top5")


def test_check_same_classes_names_both_roots(scenes, tmp_path):
    train, test = scenes
    check_same_classes(train, test)  # same class list: no error
    (tmp_path / "only" / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "cat" / "0.png")
    other = load_records("folder", images=tmp_path / "only")
    with pytest.raises(ValueError, match=r"different classes: 10 vs 1") as err:
        check_same_classes(train, other)
    assert str(train.root) in str(err.value) and str(other.root) in str(err.value)


def test_importing_metrics_loads_neither_torch_nor_sklearn():
    # The command line takes TASKS from here while building its parser; torch would slow every --help.
    code = "import sys, objcrop.evaluate.metrics; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_labels_for_task_single_gives_each_images_one_label_as_int64(tmp_path):
    from PIL import Image

    for name, count in (("ant", 2), ("bee", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    records = load_records("folder", images=tmp_path)
    single = labels_for_task(records, "single")
    assert single.dtype == np.int64 and single.shape == (5,)
    assert sorted(single.tolist()) == [0, 0, 1, 1, 1] and np.array_equal(single, records.labels)


def test_labels_for_task_single_names_the_first_image_without_exactly_one_label(scenes):
    train, _ = scenes
    counts = np.diff(train.label_offsets)
    first, many = int(np.flatnonzero(counts != 1)[0]), int((counts != 1).sum())
    with pytest.raises(ValueError) as err:
        labels_for_task(train, "single")
    assert str(err.value) == (
        f"--task single needs exactly one label per image; {train.path(first)} has {int(counts[first])} "
        f"({many} such images); use --task multi"
    )


def test_labels_for_task_refuses_a_dataset_without_classes():
    from types import SimpleNamespace

    empty = SimpleNamespace(num_classes=0, root="/data/none")
    for task in TASKS:
        with pytest.raises(ValueError, match=r"^dataset under /data/none has no classes to evaluate$"):
            labels_for_task(empty, task)


def test_chance_and_top1_edge_cases():
    assert math.isnan(chance_level("multi", np.zeros((0, 3))))
    assert math.isnan(chance_level("single", np.zeros(0, int)))
    assert math.isnan(chance_level("multi", np.zeros((4, 3))))  # no class has a positive
    assert chance_level("single", np.array([2, 2, 0])) == pytest.approx(200 / 3)  # the largest class is the last
    assert chance_level("multi", np.array([[1, 1], [0, 1]])) == pytest.approx(75.0)
    # Labels as a column ([N, 1]) count like [N]; the highest score is taken per row, not per column.
    assert top1_accuracy(np.array([[1], [0]]), np.array([[0.1, 0.9], [0.2, 0.3]])) == 50.0
    assert top1_accuracy(np.array([1, 1, 0]), np.array([[0.0, 5.0], [0.0, 4.0], [3.0, 9.0]])) == pytest.approx(200 / 3)


def test_map_needs_two_dimensional_inputs_and_counts_evaluated_and_skipped_classes():
    with pytest.raises(ValueError, match=r"targets \(3,\) and scores \(3,\) must both be \[N, C\]"):
        mean_average_precision(np.array([1, 0, 1]), np.array([0.5, 0.2, 0.9]))
    targets = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.1, 0.3], [0.1, 0.2, 0.8, 0.4], [0.5, 0.3, 0.7, 0.5]])
    value, evaluated, skipped = mean_average_precision(targets, scores)
    assert (value, evaluated, skipped) == (pytest.approx(100.0), 2, 2)
    # Integer scores are compared as numbers: a tie ranks both, AP of class 0 = (1/2 + 2/3) / 2.
    tied = mean_average_precision(np.array([[1], [0], [1]]), np.array([[1], [1], [0]]))[0]
    assert tied == pytest.approx(100 * (0.5 + 2 / 3) / 2)


def test_chance_without_any_positive_is_nan_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" on the way
        assert np.isnan(chance_level("multi", np.zeros((4, 3), np.float32)))


def test_single_label_metrics_take_labels_as_a_column_too():
    column = np.array([[0], [1], [1], [2]])
    assert chance_level("single", column) == 50.0
    scores = np.eye(3)[[0, 1, 2, 2]]  # right, right, wrong, right
    assert top1_accuracy(column, scores) == 75.0
    assert top1_accuracy(np.array([2]), np.array([[0.1, 0.2, 0.7]])) == 100.0  # one sample is a valid split


def test_a_class_with_a_single_positive_is_evaluated():
    targets = np.array([[1, 0], [0, 1], [0, 1], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.6], [0.1, 0.2]])
    value, evaluated, skipped = mean_average_precision(targets, scores)
    assert (value, evaluated, skipped) == (100.0, 2, 0)
