"""Linear probe: lr/wd selection on val only, the cached probe end to end, the paper protocol's frozen
backbone and augmented batches, and the light front door ``objcrop.evaluate.linear``."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import objcrop.evaluate.cached_probe as cached_probe
import objcrop.evaluate.linear as linear
import objcrop.evaluate.paper_probe as paper_probe
from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.evaluate.backbone import backbone_info
from objcrop.evaluate.cached_probe import evaluate_linear, fit_linear, split_train_val, train_linear
from objcrop.evaluate.features import cache_entry_name, extract_features, readout_transform
from objcrop.evaluate.linear import linear_probe
from objcrop.evaluate.metrics import chance_level, labels_for_task
from objcrop.evaluate.paper_probe import paper_linear_probe, paper_milestones

torch.set_num_threads(1)
SIZE = 16


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, 50, size=64, test_fraction=0.3, progress=False)
    train = load_records("coco", annotations=out / "train.json", images=out / "images")
    test = load_records("coco", annotations=out / "test.json", images=out / "images")
    return train, test


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
    assert evaluate_linear(model, x[200:], multi[200:], "multi")[0] > 95
    single = x[:, :4].argmax(1)
    model = fit_linear(x[:200], single[:200], "single", lr=1.0, weight_decay=0.0, epochs=100)
    assert evaluate_linear(model, x[200:], single[200:], "single")[0] > 85


def test_train_linear_keeps_the_best_grid_point_on_val():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = (x[:, :2] + 0.5 * rng.normal(size=(120, 2)) > 0).astype(np.float32)
    model, chosen = train_linear(x[:80], y[:80], x[80:], y[80:], "multi", lrs=(1e-4, 0.1), wds=(0.0, 10.0), epochs=10)
    assert len(chosen["grid"]) == 4
    assert chosen["val_value"] == max(p["val_value"] for p in chosen["grid"])
    assert evaluate_linear(model, x[80:], y[80:], "multi")[0] == pytest.approx(chosen["val_value"])
    assert chosen["weight_decay"] == 0.0  # wd 10 shrinks the weights to nothing


def test_linear_probe_chooses_on_val_only_and_caches(scenes, tmp_path, monkeypatch):
    train, test = scenes
    seen = []
    real = cached_probe.train_linear

    def spy(train_x, train_y, val_x, val_y, *args, **kwargs):
        seen.append((train_x, train_y, val_x, val_y))
        return real(train_x, train_y, val_x, val_y, *args, **kwargs)

    monkeypatch.setattr(cached_probe, "train_linear", spy)
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


def _colour_folders(root, layout: dict[str, list[tuple[int, int, int]]], noise: int = 0, seed: int = 0):
    """A ``folder`` dataset: ``layout`` maps each class folder to the colours of its 20x20 images."""
    rng = np.random.default_rng(seed)
    for name, colours in layout.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            pixels = np.full((20, 20, 3), colour, np.int64)
            if noise:
                pixels += rng.integers(-noise, noise, size=pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return load_records("folder", images=root)


RED, BLUE = (220, 30, 20), (20, 40, 220)


class _Recorder(nn.Module):
    """A small conv + BatchNorm backbone that keeps a copy of every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def _epoch_images(recorder: _Recorder) -> list[torch.Tensor]:
    """The images of each one-batch epoch, in a fixed order (sorted by their pixel sums), without the
    all-zeros call that measures the feature width."""
    batches = recorder.seen[1:]
    return [b[torch.argsort(b.flatten(1).sum(1))] for b in batches]


def test_paper_protocol_keeps_the_backbone_frozen_and_augments_every_epoch(scenes, monkeypatch):
    train, _ = scenes
    assert paper_milestones(100) == [60, 80] and paper_milestones(5) == [3, 4]
    labels = labels_for_task(train, "multi")
    net = _Recorder().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run = dict(epochs=2, batch_size=len(train), progress=False)  # one batch per epoch
    head = paper_linear_probe(net, train, labels, "multi", SIZE, **run)

    # Frozen: same weights and BatchNorm statistics, no gradient, and the caller's train mode is back.
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters()) and net.training
    assert head.fc.weight.shape == (10, 4) and head.fc.weight.abs().sum() > 0

    # Augmented: both epochs saw every image, as different random crops; the read-out transform in
    # its place would show the same pixels twice (so the comparison can tell the two apart).
    first, second = _epoch_images(net)
    assert first.shape == second.shape == (len(train), 3, SIZE, SIZE)
    assert not torch.equal(first, second)
    plain = _Recorder()
    monkeypatch.setattr(paper_probe, "augment_transform", readout_transform)
    paper_linear_probe(plain, train, labels, "multi", SIZE, **run)
    assert torch.equal(*_epoch_images(plain))


def test_paper_protocol_is_seeded_and_learns_a_separable_problem(tmp_path):
    train = _colour_folders(tmp_path / "train", {"blue": [BLUE] * 8, "red": [RED] * 8}, noise=30)
    test = _colour_folders(tmp_path / "test", {"blue": [BLUE] * 4, "red": [RED] * 4}, noise=30, seed=1)
    colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # the mean colour: separates red from blue
    labels = labels_for_task(train, "single")
    run = dict(epochs=4, batch_size=4, seed=3, progress=False)

    def probe(**kwargs):
        # ``seed`` drives the head's initial weights, the batch order and the crops: the caller's global
        # generator must not matter.
        torch.manual_seed(int(torch.randint(1000, ())) + 1)
        return paper_linear_probe(colour, train, labels, "single", SIZE, **{**run, **kwargs})

    head = probe()
    assert torch.equal(head.fc.weight, probe().fc.weight)
    assert not torch.equal(head.fc.weight, probe(seed=4).fc.weight)
    test_x = extract_features(colour, test, SIZE, progress=False)
    assert evaluate_linear(head, test_x, labels_for_task(test, "single"), "single")[0] == 100.0


def test_paper_protocol_end_to_end_reports_what_it_scored(scenes):
    train, test = scenes
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
    assert (result.protocol, result.metric, result.lr, result.weight_decay, result.epochs) == (
        "paper",
        "mAP",
        30.0,
        0.0,
        2,
    )
    assert (result.train_images, result.test_images, result.images_skipped) == (len(train), len(test), 0)
    assert result.feature_dim == 512 and result.classes_evaluated + result.classes_skipped == 10
    assert result.chance == pytest.approx(chance_level("multi", labels_for_task(test, "multi")))
    assert result.val_value is None and result.cache_hits == 0


def test_unknown_protocol_and_mismatched_classes_are_refused_before_any_work(scenes, tmp_path):
    train, test = scenes
    with pytest.raises(ValueError, match="unknown protocol 'fast'; choose one of cached, paper"):
        linear_probe("missing.pth", train, test, protocol="fast")
    other = _colour_folders(tmp_path / "other", {"blue": [BLUE]})
    with pytest.raises(ValueError, match="different classes"):
        linear_probe("missing.pth", train, other)  # before the missing weights are looked at


def test_the_front_door_reexports_the_protocols_and_imports_no_torch():
    assert linear.fit_linear is fit_linear and linear.train_linear is train_linear
    assert linear.split_train_val is split_train_val and linear.paper_milestones is paper_milestones
    assert linear.LinearClassifier is cached_probe.LinearClassifier
    assert set(linear.__all__) <= set(dir(linear))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        linear.nothing  # noqa: B018
    code = "import sys, objcrop.evaluate.linear; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_single_label_folder_dataset_reports_top1(tmp_path):
    train = _colour_folders(tmp_path / "train", {"blue": [BLUE] * 12, "red": [RED] * 12}, noise=30)
    test = _colour_folders(tmp_path / "test", {"blue": [BLUE] * 6, "red": [RED] * 6}, noise=30, seed=1)
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


# ----------------------------------------------------------- unreadable images: counted, never hidden

BAD_JPEG = b"\xff\xd8\xff\xe0 a truncated JPEG"


def _with_unreadable(tmp_path):
    """Red/blue folders read while whole, then 1 training and 2 test images overwritten with a broken JPEG
    (a dataset whose files went bad after it was listed); the broken rows' indices per split."""
    train = _colour_folders(tmp_path / "train", {"blue": [BLUE] * 6, "red": [RED] * 6}, noise=30)
    test = _colour_folders(tmp_path / "test", {"blue": [BLUE] * 3, "red": [RED] * 3}, noise=30, seed=1)
    bad = {"train": [7], "test": [0, 4]}
    for split, records in (("train", train), ("test", test)):
        for i in bad[split]:
            Path(records.path(i)).write_bytes(BAD_JPEG)
    return train, test, bad


def test_cached_probe_counts_the_unreadable_images_of_both_splits_and_scores_without_them(tmp_path):
    train, test, bad = _with_unreadable(tmp_path)
    args = dict(task="single", size=SIZE, small_images=True, lrs=(0.1, 1.0), wds=(0.0,), epochs=5, progress=False)
    result = linear_probe("random:resnet18", train, test, cache_dir=tmp_path / "cache", **args)
    assert (result.train_images, result.test_images, result.images_skipped) == (11, 4, 3)
    assert linear_probe("random:resnet18", train, test, cache_dir=tmp_path / "cache", **args).images_skipped == 3
    # Left out, not scored as blank images: the same numbers as the probe of the readable images alone.
    readable = {split: np.setdiff1d(np.arange(len(r)), bad[split]) for split, r in (("train", train), ("test", test))}
    alone = linear_probe(
        "random:resnet18",
        train.subset(readable["train"]),
        test.subset(readable["test"]),
        cache_dir=tmp_path / "c2",
        **args,
    )
    assert alone.images_skipped == 0 and (alone.train_images, alone.test_images) == (11, 4)
    assert (result.value, result.val_value, result.lr) == (alone.value, alone.val_value, alone.lr)


def test_paper_protocol_counts_unreadable_training_images_once_and_test_ones(tmp_path, caplog):
    train, test, bad = _with_unreadable(tmp_path)
    colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    run = dict(epochs=3, batch_size=4, progress=False)
    with caplog.at_level(logging.WARNING, logger="objcrop.evaluate.paper_probe"):
        head = paper_linear_probe(colour, train, labels_for_task(train, "single"), "single", SIZE, **run)
    assert head.unreadable == bad["train"]  # read in each of the 3 epochs, counted once
    assert "1 of 12 training images could not be read" in caplog.text

    result = linear_probe(
        "random:resnet18", train, test, task="single", size=SIZE, small_images=True, protocol="paper",
        paper_epochs=2, batch_size=4, progress=False,
    )  # fmt: skip
    assert (result.train_images, result.test_images, result.images_skipped) == (11, 4, 3)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_paper_protocol_without_a_readable_training_image_is_an_error(tmp_path):
    train = _colour_folders(tmp_path / "train", {"blue": [BLUE] * 2, "red": [RED] * 2})
    for i in range(len(train)):
        Path(train.path(i)).write_bytes(BAD_JPEG)
    colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="none of the 4 training images"):
        paper_linear_probe(colour, train, labels_for_task(train, "single"), "single", SIZE, epochs=1, progress=False)
