"""The supervised baseline learns an easy multi-label set, saves a loadable file, and is scored twice."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from objcrop.cli import main
from objcrop.data.records import Record, Records
from objcrop.evaluate.backbone import backbone_info, load_backbone
from objcrop.evaluate.supervised import build_classifier, save_classifier, supervised_baseline, train_supervised

torch.set_num_threads(1)
SIZE = 16
COLOURS = ((230, 30, 30), (30, 200, 30))  # class 0: a red square, class 1: a green square


def _easy_set(folder, n: int, seed: int) -> Records:
    """Gray noisy images with a red and/or a green square; the labels say which are present."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        pixels = rng.integers(90, 150, size=(SIZE, SIZE, 3)).astype(np.uint8)
        present = rng.random(2) < 0.5
        for c in np.flatnonzero(present):
            x, y = rng.integers(0, SIZE - 6, size=2)
            pixels[y : y + 6, x : x + 6] = COLOURS[c]
        name = f"{seed}-{i}.png"
        Image.fromarray(pixels).save(folder / name)
        records.append(Record(name, SIZE, SIZE, labels=np.flatnonzero(present).astype(np.int32)))
    return Records.from_records(records, ["red", "green"], str(folder))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("easy")
    train, test = _easy_set(folder, 32, seed=0), _easy_set(folder, 16, seed=1)
    out = folder / "run" / "resnet18.pth"
    result = supervised_baseline(
        train,
        test,
        out,
        arch="resnet18",
        small_images=True,
        size=SIZE,
        epochs=3,
        batch_size=16,
        crop_scale=(0.9, 1.0),
        probe={"epochs": 10, "lrs": (0.1,), "wds": (0.0,), "cache_dir": folder / "cache"},
        progress=False,
    )
    return result, out


def test_training_reduces_the_loss_and_beats_chance(baseline):
    result, _ = baseline
    assert len(result.losses) == 3 and result.losses[-1] < result.losses[0]
    assert result.metric == "mAP" and (result.classes_evaluated, result.classes_skipped) == (2, 0)
    assert result.head_value > result.chance + 20
    assert result.linear["metric"] == "mAP" and result.linear["value"] > result.chance


def test_saved_file_is_a_torchvision_state_dict_that_load_backbone_reads(baseline):
    result, out = baseline
    state = torch.load(out, weights_only=True)
    assert state["fc.weight"].shape == (2, 512) and "layer4.1.bn2.weight" in state
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["arch"] == "resnet18" and meta["small_images"] and meta["class_names"] == ["red", "green"]
    info = backbone_info(out)
    assert (info.kind, info.arch, info.small_images) == ("state_dict", "resnet18", True)
    net, dim = load_backbone(out)  # no --arch needed, fc ignored
    full = build_classifier("resnet18", 2, small_images=True)
    full.load_state_dict(state)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(full.eval()[:-1](x), net(x))
    assert dim == 512 and result.checkpoint == str(out)


def _no_training(*args, **kwargs):
    raise AssertionError("trained although --out would have been refused")


@pytest.mark.parametrize("foreign", ["r18.pth", "r18.pth.json"])
def test_a_foreign_out_or_sidecar_is_refused_before_the_training(tmp_path, monkeypatch, foreign):
    monkeypatch.setattr("objcrop.evaluate.supervised.train_supervised", _no_training)
    records = _easy_set(tmp_path, 2, seed=0)
    (tmp_path / foreign).write_bytes(b"the user's own file")
    with pytest.raises(ValueError, match=f"{tmp_path / foreign} was not written by objcrop"):
        supervised_baseline(records, records, tmp_path / "r18.pth", progress=False)
    assert (tmp_path / foreign).read_bytes() == b"the user's own file"
    assert {p.name for p in tmp_path.iterdir()} == {"0-0.png", "0-1.png", foreign}  # nothing written


def test_the_supervised_command_exits_2_naming_a_foreign_out(tiny_scenes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("objcrop.evaluate.supervised.train_supervised", _no_training)
    out = tmp_path / "r18.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, out)  # a state dict, but not one objcrop wrote
    before = out.read_bytes()
    data = ["--format", "coco", "--images", str(tiny_scenes / "images")]
    data += [
        "--train-annotations",
        str(tiny_scenes / "train.json"),
        "--test-annotations",
        str(tiny_scenes / "test.json"),
    ]
    threads = torch.get_num_threads()
    try:
        code = main(["supervised", *data, "--epochs", "1", "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2 and f"{out} was not written by objcrop" in err and "Traceback" not in err
    assert out.read_bytes() == before and not (tmp_path / "r18.pth.json").exists()


def test_save_classifier_replaces_its_own_file_and_sidecar(tmp_path):
    out = tmp_path / "r18.pth"
    for num_classes in (2, 3):  # the second save replaces the first one's .pth and .pth.json
        model = build_classifier("resnet18", num_classes, small_images=True)
        save_classifier(model, out, "resnet18", True, [f"c{i}" for i in range(num_classes)])
    assert torch.load(out, weights_only=True)["fc.weight"].shape == (3, 512)
    assert json.loads((tmp_path / "r18.pth.json").read_text())["num_classes"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.pth", "r18.pth.json"]


def _corrupt(records: Records, indices) -> None:
    for i in indices:
        Path(records.path(i)).write_bytes(b"not an image")


def test_unreadable_training_images_are_counted_once_and_batches_without_two_are_dropped(tmp_path):
    records = _easy_set(tmp_path, 4, seed=0)
    _corrupt(records, [0, 1, 2])  # two batches of two per epoch: neither has two readable images
    model, losses, unreadable, dropped = train_supervised(records, size=SIZE, epochs=3, batch_size=2, progress=False)
    assert (unreadable, dropped) == (3, 6)
    assert losses == [0.0, 0.0, 0.0]


def test_the_baseline_reports_the_unreadable_images_of_both_splits(tmp_path, capsys):
    train, test = _easy_set(tmp_path, 32, seed=0), _easy_set(tmp_path, 16, seed=1)
    _corrupt(train, [3, 7, 20])
    _corrupt(test, [5])
    result = supervised_baseline(
        train,
        test,
        tmp_path / "r18.pth",
        small_images=True,
        size=SIZE,
        epochs=2,
        batch_size=16,
        probe={"epochs": 2, "lrs": (0.1,), "wds": (0.0,), "cache_dir": tmp_path / "cache"},
        progress=False,
    )
    assert (result.train_unreadable, result.dropped_batches, result.test_unreadable) == (3, 0, 1)
    assert result.linear["images_skipped"] == 4
    assert json.loads(json.dumps(result.to_dict()))["train_unreadable"] == 3
