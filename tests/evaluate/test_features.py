"""Frozen features: read-out transform, extraction (float16, NaN rows for unreadable images), on-disk cache."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import objcrop.evaluate.features as features
from objcrop.data.readers import load_records
from objcrop.data.records import Record, Records
from objcrop.data.synth import synthesize
from objcrop.evaluate.backbone import backbone_info, load_backbone
from objcrop.evaluate.features import (
    FeatureCache,
    cache_entry_name,
    cached_features,
    default_cache_dir,
    extract_features,
    readout_transform,
    valid_rows,
)
from objcrop.ssl.backbones import build_backbone

torch.set_num_threads(1)
SIZE = 16


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, 24, size=64, progress=False)
    return load_records("coco", annotations=out / "train.json", images=out / "images")


@pytest.fixture
def count_extractions(monkeypatch):
    calls = []
    real = features.extract_features

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "extract_features", spy)
    return calls


def test_readout_transform_modes():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    for mode in ("center", "squash"):
        out = readout_transform(SIZE, mode)(image)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    assert readout_transform(SIZE)(image)[0].mean() > 2.0  # red after ImageNet normalisation: (1 - 0.485) / 0.229
    with pytest.raises(ValueError, match="read-out mode"):
        readout_transform(SIZE, "stretch")


def test_extract_features_is_float16_ordered_and_restores_train_mode(scenes):
    net, dim = build_backbone("resnet18", small_images=True)
    net.train()
    feats = extract_features(net, scenes, SIZE, batch_size=10, progress=False)
    assert feats.dtype == np.float16 and feats.shape == (len(scenes), dim) and net.training
    again = extract_features(net, scenes.subset([3, 0]), SIZE, progress=False)
    np.testing.assert_array_equal(again, feats[[3, 0]])  # eval-mode BatchNorm: no dependence on the batch


def test_unreadable_images_become_nan_rows(tmp_path):
    Image.new("RGB", (20, 20), (0, 128, 0)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    records = Records.from_records([Record("good.png", 20, 20), Record("bad.png", 20, 20)], [], str(tmp_path))
    net, _ = load_backbone("random:resnet18", small_images=True)
    feats = extract_features(net, records, SIZE, progress=False)
    assert valid_rows(feats).tolist() == [True, False]
    with pytest.raises(ValueError, match="none of the 1 images"):
        extract_features(net, records.subset([1]), SIZE, progress=False)


def test_cache_hit_miss_and_stale_weights(scenes, tmp_path, count_extractions):
    trunk, _ = build_backbone("resnet18", small_images=True)
    weights = tmp_path / "w.pth"
    torch.save(trunk.state_dict(), weights)
    cache = tmp_path / "cache"
    args = dict(records=scenes, split="train", size=SIZE, cache_dir=cache, arch="resnet18", small_images=True)

    first, hit = cached_features(weights, progress=False, **args)
    assert not hit and len(count_extractions) == 1
    name = cache_entry_name(backbone_info(weights, "resnet18", True), "train", SIZE)
    on_disk = np.load(cache / f"{name}.npy", allow_pickle=False)
    assert on_disk.dtype == np.float16
    sidecar = json.loads((cache / f"{name}.json").read_text())
    assert sidecar["key"]["backbone"]["path"] == str(weights.resolve()) and sidecar["key"]["size"] == SIZE

    second, hit = cached_features(weights, progress=False, **args)
    assert hit and len(count_extractions) == 1
    np.testing.assert_array_equal(first, second)

    # New weights written over the same file: another mtime and the cache is stale.
    torch.save({k: v + 0.1 if v.is_floating_point() else v for k, v in trunk.state_dict().items()}, weights)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third, hit = cached_features(weights, progress=False, **args)
    assert not hit and len(count_extractions) == 2
    assert not np.array_equal(first, third)
    assert sorted(p.name for p in cache.iterdir()) == [f"{name}.json", f"{name}.npy"]  # replaced, not added


def test_cache_is_keyed_by_dataset_size_and_seed(scenes, tmp_path, count_extractions):
    args = dict(split="train", cache_dir=tmp_path, small_images=True, progress=False)
    cached_features("random:resnet18", scenes, size=SIZE, **args)
    assert cached_features("random:resnet18", scenes, size=SIZE, **args)[1]
    assert not cached_features("random:resnet18", scenes, size=SIZE, seed=1, **args)[1]  # other random weights
    assert cached_features("random:resnet18", scenes, size=SIZE, **args)[1]  # both backbones kept in one folder
    assert not cached_features("random:resnet18", scenes.subset(range(10)), size=SIZE, **args)[1]  # other images
    assert not cached_features("random:resnet18", scenes, size=8, **args)[1]  # another size: its own entry
    assert cached_features("random:resnet18", scenes, size=8, **args)[1]
    assert cached_features("random:resnet18", scenes, size=SIZE, seed=1, **args)[1]
    assert len(count_extractions) == 4


def test_feature_cache_rejects_damaged_entries(tmp_path):
    cache = FeatureCache(tmp_path)
    key = {"a": 1}
    cache.save("x", key, np.ones((3, 4), np.float32))
    assert cache.load("x", key).dtype == np.float16
    assert cache.load("x", {"a": 2}) is None
    array_path, meta_path = cache.paths("x")
    np.save(array_path, np.ones((2, 4), np.float16))  # shape disagrees with the sidecar
    assert cache.load("x", key) is None
    meta_path.write_text("{not json")
    assert cache.load("x", key) is None


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir("random:resnet50") == tmp_path / "objcrop" / "features" / "resnet50-random"
    assert default_cache_dir("runs/a/ckpt-00000010.pt") == Path("runs/a/ckpt-00000010.pt.features")
