"""Weighted kNN: exact weights, separable sets, multi-label mAP, the training-time monitor."""

import math

import numpy as np
import pytest
import torch

from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.evaluate.backbone import load_backbone
from objcrop.evaluate.knn import KNNMonitor, knn_evaluate, knn_scores

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


def test_monitor_returns_the_metric_and_keeps_the_training_mode(tmp_path):
    synthesize(tmp_path, 30, size=64, progress=False)
    train = load_records("coco", annotations=tmp_path / "train.json", images=tmp_path / "images")
    test = load_records("coco", annotations=tmp_path / "test.json", images=tmp_path / "images")
    monitor = KNNMonitor(train, test, size=16, k=(5, 20), max_train=20, max_test=5, batch_size=8)
    assert len(monitor.train) == 20 and len(monitor.test) == 5
    net, _ = load_backbone("random:resnet18", small_images=True)
    net.train()
    stats = monitor(net)
    assert set(stats) <= {"knn_map@5", "knn_map@20"} and "knn_map@5" in stats
    assert all(0 <= v <= 100 for v in stats.values()) and net.training
