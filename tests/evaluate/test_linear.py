"""Linear probe: metrics, lr/wd selection on val only, the cached probe end to end, the paper protocol."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import objcrop.evaluate.linear as linear
from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.evaluate.backbone import backbone_info
from objcrop.evaluate.features import cache_entry_name
from objcrop.evaluate.linear import (
    chance_level,
    fit_linear,
    labels_for_task,
    linear_probe,
    mean_average_precision,
    paper_milestones,
    split_train_val,
    top1_accuracy,
    train_linear,
)

torch.set_num_threads(1)
SIZE = 16


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, 50, size=64, test_fraction=0.3, progress=False)
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
    assert chance_level("single", np.array([0, 1, 1, 1])) == 75.0
    # Mean prevalence of the classes that have a positive (the third has none).
    assert chance_level("multi", np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])) == pytest.approx(37.5)


def test_labels_for_task(scenes):
    train, _ = scenes
    multi = labels_for_task(train, "multi")
    assert multi.shape == (len(train), 10) and multi.dtype == np.float32
    with pytest.raises(ValueError, match="exactly one label"):
        labels_for_task(train, "single")  # the scenes have 2-6 objects


def test_split_train_val_is_seeded_disjoint_and_complete():
    fit, val = split_train_val(50, 0.2, seed=1)
    assert len(val) == 10 and len(fit) == 40
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(50))
    again = split_train_val(50, 0.2, seed=1)
    assert np.array_equal(fit, again[0]) and not np.array_equal(val, split_train_val(50, 0.2, seed=2)[1])


def test_fit_linear_learns_separable_problems():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float16)
    multi = (x[:, :3] > 0).astype(np.float32)
    model = fit_linear(x[:200], multi[:200], "multi", lr=0.1, weight_decay=0.0, epochs=30)
    assert linear.evaluate_linear(model, x[200:], multi[200:], "multi")[0] > 95
    single = x[:, :4].argmax(1)
    model = fit_linear(x[:200], single[:200], "single", lr=1.0, weight_decay=0.0, epochs=100)
    assert linear.evaluate_linear(model, x[200:], single[200:], "single")[0] > 85


def test_train_linear_keeps_the_best_grid_point_on_val():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = (x[:, :2] + 0.5 * rng.normal(size=(120, 2)) > 0).astype(np.float32)
    model, chosen = train_linear(x[:80], y[:80], x[80:], y[80:], "multi", lrs=(1e-4, 0.1), wds=(0.0, 10.0), epochs=10)
    assert len(chosen["grid"]) == 4
    assert chosen["val_value"] == max(p["val_value"] for p in chosen["grid"])
    assert linear.evaluate_linear(model, x[80:], y[80:], "multi")[0] == pytest.approx(chosen["val_value"])
    assert chosen["weight_decay"] == 0.0  # wd 10 shrinks the weights to nothing


def test_linear_probe_chooses_on_val_only_and_caches(scenes, tmp_path, monkeypatch):
    train, test = scenes
    seen = []
    real = linear.train_linear

    def spy(train_x, train_y, val_x, val_y, *args, **kwargs):
        seen.append((train_x, train_y, val_x, val_y))
        return real(train_x, train_y, val_x, val_y, *args, **kwargs)

    monkeypatch.setattr(linear, "train_linear", spy)
    args = dict(task="multi", size=SIZE, cache_dir=tmp_path, small_images=True, epochs=5, progress=False)
    result = linear_probe("random:resnet18", train, test, lrs=(0.1, 1.0), wds=(0.0,), **args)

    ((fit_x, fit_y, val_x, val_y),) = seen
    assert len(fit_x) + len(val_x) == len(train) and len(val_x) == round(0.2 * len(train))
    # Every row given to the selection is a train row (features and labels), never a test row.
    info = backbone_info("random:resnet18", small_images=True)
    train_x = np.load(tmp_path / f"{cache_entry_name(info, 'train', SIZE)}.npy")
    test_x = np.load(tmp_path / f"{cache_entry_name(info, 'test', SIZE)}.npy")
    train_pairs = {(x.tobytes(), y.tobytes()) for x, y in zip(train_x, train.label_matrix(), strict=True)}
    given = [(x.tobytes(), y.astype(np.uint8).tobytes()) for x, y in zip(fit_x, fit_y, strict=True)]
    given += [(x.tobytes(), y.astype(np.uint8).tobytes()) for x, y in zip(val_x, val_y, strict=True)]
    assert set(given) == train_pairs
    assert not {x.tobytes() for x in test_x} & {x for x, _ in given}

    d = result.to_dict()
    assert d["metric"] == "mAP" and 0 <= d["value"] <= 100 and d["lr"] in (0.1, 1.0)
    assert d["classes_evaluated"] + d["classes_skipped"] == 10 and d["test_images"] == len(test)
    assert d["cache_hits"] == 0 and len(d["grid"]) == 2
    assert linear_probe("random:resnet18", train, test, lrs=(0.1,), wds=(0.0,), **args).cache_hits == 2


def test_paper_protocol_runs_through_the_frozen_net(scenes):
    train, test = scenes
    assert paper_milestones(100) == [60, 80] and paper_milestones(5) == [3, 4]
    result = linear_probe(
        "random:resnet18",
        train,
        test,
        size=SIZE,
        small_images=True,
        protocol="paper",
        paper_epochs=2,
        batch_size=16,
        progress=False,
    )
    assert result.protocol == "paper" and result.metric == "mAP" and result.lr == 30.0
    assert 0 <= result.value <= 100 and result.feature_dim == 512


def test_single_label_folder_dataset_reports_top1(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for name, colour in (("blue", (20, 40, 220)), ("red", (220, 30, 20))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-30, 30, size=(20, 20, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    train = load_records("folder", images=tmp_path / "train")
    test = load_records("folder", images=tmp_path / "test")
    result = linear_probe(
        "random:resnet18",
        train,
        test,
        task="single",
        size=SIZE,
        small_images=True,
        cache_dir=tmp_path / "cache",
        lrs=(0.1,),
        wds=(0.0,),
        epochs=20,
        progress=False,
    )
    assert result.metric == "top1" and result.value == 100.0 and result.chance == 50.0
    assert (result.classes_evaluated, result.classes_skipped) == (2, 0)
