"""Weighted kNN: exact weights, separable sets, multi-label mAP, the training-time monitor, the cached probe."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from objcrop.data.readers import load_records
from objcrop.evaluate.features import cached_features
from objcrop.evaluate.knn import KNNMonitor, knn_evaluate, knn_probe, knn_scores
from objcrop.evaluate.metrics import labels_for_task

torch.set_num_threads(1)


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_scores_are_the_normalised_exp_sim_over_t_vote():
    train = np.array([_unit(0), _unit(60), _unit(90), _unit(180)], np.float32) * 3.0  # norms do not matter
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    test = np.array([_unit(10)], np.float32)
    scores = knn_scores(train, targets, test, k=3, temperature=0.5)
    sims = np.cos(np.radians([10, 50, 80]))  # the three nearest: 0, 60, 90 degrees
    w = np.exp(sims / 0.5)
    expected = np.array([w[0] + w[2], w[1] + w[2]]) / w.sum()
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)


def test_weighting_lets_one_close_neighbour_outvote_two_far_ones():
    train = np.array([_unit(5), _unit(80), _unit(85)], np.float32)
    labels = np.array([0, 1, 1])
    test = np.array([_unit(0)], np.float32)
    (sharp,) = knn_evaluate(train, labels, test, np.array([0]), k=(3,), temperature=0.07, task="single")
    (flat,) = knn_evaluate(train, labels, test, np.array([0]), k=(3,), temperature=100.0, task="single")
    assert sharp.value == 100.0 and flat.value == 0.0  # a near-uniform vote is the plain majority


def test_separable_clusters_score_100_single_and_multi_label():
    rng = np.random.default_rng(0)
    centers = np.eye(8, dtype=np.float32)[:4] * 10
    labels = rng.integers(0, 4, size=200)
    feats = (centers[labels] + rng.normal(scale=0.5, size=(200, 8))).astype(np.float16)
    results = knn_evaluate(feats[:150], labels[:150], feats[150:], labels[150:], k=(20, 200), task="single")
    assert [r.k for r in results] == [20, 200] and all(r.value == 100.0 for r in results)
    assert results[0].metric == "top1"

    multi = np.zeros((200, 5), np.float32)
    multi[np.arange(200), labels] = 1
    multi[:, 4] = labels >= 2  # a super-class shared by clusters 2 and 3
    (result,) = knn_evaluate(feats[:150], multi[:150], feats[150:], multi[150:], k=(20,), task="multi")
    assert result.metric == "mAP" and result.value == pytest.approx(100.0)
    assert (result.classes_evaluated, result.classes_skipped) == (5, 0)


def test_nan_rows_are_left_out():
    feats = np.array([[1, 0], [0, 1], [np.nan, np.nan]], np.float16)
    labels = np.array([0, 1, 0])
    (result,) = knn_evaluate(feats, labels, feats[:2], labels[:2], k=(1,), task="single")
    assert result.value == 100.0


RED, BLUE = (220, 30, 20), (20, 40, 220)


def _colour_folders(root, layout: dict[str, list[tuple[int, int, int]]]):
    """A ``folder`` dataset of plain 12x12 images: ``layout`` maps each class folder to its images' colours."""
    for name, colours in layout.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (12, 12), colour).save(root / name / f"{i}.png")
    return load_records("folder", images=root)


def _mean_colour() -> nn.Module:
    # Features are the image's mean colour: one point per colour, so the answer is known in advance.
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_monitor_scores_100_when_the_colour_is_the_class_and_chance_when_it_is_not(tmp_path):
    train = _colour_folders(tmp_path / "train", {"blue": [BLUE] * 6, "red": [RED] * 6})
    test = _colour_folders(tmp_path / "test", {"blue": [BLUE] * 3, "red": [RED] * 3})
    monitor = KNNMonitor(train, test, size=8, task="single", k=(3, 12), max_train=10, max_test=4, batch_size=4)
    assert len(monitor.train) == 10 and len(monitor.test) == 4  # seeded subsets
    net = _mean_colour().train()
    assert monitor(net) == {"knn_top1@3": 100.0, "knn_top1@12": 100.0, "knn_images_skipped": 0.0} and net.training

    # Each class holds both colours equally: a test image's same-colour neighbours split their vote
    # evenly, the tie goes to the first class, so exactly the test images of that class are right.
    mixed = {"a": [RED, BLUE] * 3, "b": [RED, BLUE] * 3}
    train = _colour_folders(tmp_path / "mixed_train", mixed)
    test = _colour_folders(tmp_path / "mixed_test", {"a": [RED, BLUE], "b": [BLUE, RED]})
    monitor = KNNMonitor(train, test, size=8, task="single", k=(12,), batch_size=4)
    assert monitor(net) == {"knn_top1@12": 50.0, "knn_images_skipped": 0.0}

    # Files gone bad after listing (a blue training image, a red test image) are left out and counted. Kept
    # as blank rows, the red one would be equally close to all 12 training images and go to the majority, blue.
    train = _colour_folders(tmp_path / "bad_train", {"blue": [BLUE] * 7, "red": [RED] * 5})
    test = _colour_folders(tmp_path / "bad_test", {"blue": [BLUE] * 3, "red": [RED] * 3})
    Path(train.path(0)).write_bytes(b"\xff\xd8\xff\xe0 a truncated JPEG")
    Path(test.path(4)).write_bytes(b"\xff\xd8\xff\xe0 a truncated JPEG")
    monitor = KNNMonitor(train, test, size=8, task="single", k=(12,), batch_size=4)
    assert monitor(net) == {"knn_top1@12": 100.0, "knn_images_skipped": 2.0}


def test_knn_probe_scores_the_cached_features_and_checks_the_classes(tmp_path):
    train = _colour_folders(tmp_path / "train", {"blue": [BLUE] * 4, "red": [RED] * 4})
    test = _colour_folders(tmp_path / "test", {"blue": [BLUE] * 2, "red": [RED] * 2})
    args = dict(size=8, cache_dir=tmp_path / "cache", small_images=True, progress=False)
    result = knn_probe("random:resnet18", train, test, task="single", k=(3, 5), temperature=0.5, **args)

    # The same numbers as knn_evaluate on the features the cache now holds (shared with the linear probe).
    feats = {}
    for split, records in (("train", train), ("test", test)):
        feats[split], hit = cached_features("random:resnet18", records, split, **args)
        assert hit
    expected = knn_evaluate(
        feats["train"],
        labels_for_task(train, "single"),
        feats["test"],
        labels_for_task(test, "single"),
        k=(3, 5),
        temperature=0.5,
        task="single",
        num_classes=2,
    )
    assert result.results == expected
    d = result.to_dict()
    assert d["k"] == 3 and d["metric"] == "top1" and d["temperature"] == 0.5
    assert [r["k"] for r in d["results"]] == [3, 5] and d["value"] == expected[0].value

    other = _colour_folders(tmp_path / "other", {"green": [(0, 200, 0)]})
    with pytest.raises(ValueError, match="different classes: 2 vs 1"):
        knn_probe("random:resnet18", train, other, **args)
    with pytest.raises(ValueError, match="at least one k"):
        knn_probe("random:resnet18", train, test, k=(), **args)


def test_knn_probe_counts_the_unreadable_images_and_scores_without_them(tmp_path):
    """Files that went bad after the dataset was listed: 1 of 8 training and 2 of 4 test images."""
    train = _colour_folders(tmp_path / "train", {"blue": [BLUE] * 4, "red": [RED] * 4})
    test = _colour_folders(tmp_path / "test", {"blue": [BLUE] * 2, "red": [RED] * 2})
    bad = {"train": [5], "test": [0, 3]}
    for split, records in (("train", train), ("test", test)):
        for i in bad[split]:
            Path(records.path(i)).write_bytes(b"\xff\xd8\xff\xe0 a truncated JPEG")
    args = dict(task="single", k=(3,), size=8, small_images=True, progress=False)
    result = knn_probe("random:resnet18", train, test, cache_dir=tmp_path / "cache", **args)
    assert (result.train_images, result.test_images, result.images_skipped) == (7, 2, 3)
    d = knn_probe("random:resnet18", train, test, cache_dir=tmp_path / "cache", **args).to_dict()  # cached
    assert (d["train_images"], d["test_images"], d["images_skipped"]) == (7, 2, 3)
    # Left out, not voting or scored as blank images: the probe of the readable images alone.
    keep = {split: np.setdiff1d(np.arange(len(r)), bad[split]) for split, r in (("train", train), ("test", test))}
    alone = knn_probe(
        "random:resnet18", train.subset(keep["train"]), test.subset(keep["test"]), cache_dir=tmp_path / "c2", **args
    )
    assert alone.images_skipped == 0 and alone.results == result.results
