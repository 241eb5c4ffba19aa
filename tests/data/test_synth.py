"""Tests of ``objcrop synth``: scenes, the written COCO dataset, sprite mode and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from objcrop.boxes import iou
from objcrop.cli import main
from objcrop.data.synth import SYNTH_CLASSES, render_scene, split_indices, synthesize
from objcrop.data.synth_backgrounds import BackgroundBank
from objcrop.data.synth_scene import paste_patches, render_scene_with_areas
from objcrop.data.synth_shapes import OBJECT_CLASSES, TEXTURES, Patch, render_object, texture_mask
from objcrop.data.synth_sprites import SpriteBank
from tests.conftest import SHARED_DATA, needs_shared_data


def _scenes(n: int, seed0: int = 0, **kwargs):
    return [render_scene(seed0 + i, **kwargs) for i in range(n)]


def test_render_scene_is_deterministic_per_seed():
    a_img, a_boxes, a_labels = render_scene(7)
    b_img, b_boxes, b_labels = render_scene(np.random.default_rng(7))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_boxes, b_boxes)
    np.testing.assert_array_equal(a_labels, b_labels)
    c_img, _, _ = render_scene(8)
    assert np.abs(a_img.astype(int) - c_img.astype(int)).mean() > 10


def test_scenes_have_valid_boxes_counts_and_sizes():
    size = 128
    for image, boxes, labels in _scenes(40, size=size):
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
        assert 2 <= len(labels) <= 6
        assert labels.min() >= 0 and labels.max() < len(SYNTH_CLASSES)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        longest = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        assert (longest >= 0.05 * size - 1e-3).all() and (longest <= 0.25 * size + 1e-3).all()


def test_scene_settings_are_respected():
    for image, boxes, labels in _scenes(10, size=96, min_objects=4, max_objects=4, min_scale=0.2, max_scale=0.3):
        assert image.shape == (96, 96, 3)
        assert len(labels) == 4
        longest = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        assert (longest >= 0.2 * 96 - 1e-3).all() and (longest <= 0.3 * 96 + 1e-3).all()


def test_every_class_appears_and_objects_are_visible():
    seen = np.zeros(len(SYNTH_CLASSES), dtype=int)
    for i in range(60):
        _, boxes, labels, areas = render_scene_with_areas(i)
        seen += np.bincount(labels, minlength=len(SYNTH_CLASSES))
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert (areas > 0).all() and (areas <= box_area + 1).all()
    assert (seen > 0).all(), seen


def test_rendered_object_box_has_the_requested_side():
    rng = np.random.default_rng(0)
    for label in range(len(SYNTH_CLASSES)):
        patch = render_object(rng, label, 20.0)
        w, h = patch.box[2] - patch.box[0], patch.box[3] - patch.box[1]
        assert max(w, h) == pytest.approx(20.0, abs=1e-3)
        assert patch.rgb.shape[:2] == patch.alpha.shape and patch.label == label
        assert patch.box[2] <= patch.alpha.shape[1] and patch.box[3] <= patch.alpha.shape[0]
        covered = np.argwhere(patch.alpha > 0.5)
        assert covered.min(0).tolist() >= [0, 0] and covered.max(0)[0] < patch.box[3] + 1


def test_class_table_needs_two_cues():
    for attr in ("shape", "texture", "colour"):
        values = [getattr(c, attr) for c in OBJECT_CLASSES]
        assert all(values.count(v) == 2 for v in values), attr
    for i, a in enumerate(OBJECT_CLASSES):
        for b in OBJECT_CLASSES[i + 1 :]:
            shared = (a.shape == b.shape) + (a.texture == b.texture) + (a.colour == b.colour)
            assert shared <= 1, (a, b)
    assert len(set(SYNTH_CLASSES)) == 10


@pytest.mark.parametrize("texture", TEXTURES)
def test_textures_are_two_toned(texture):
    v, u = np.mgrid[-20:20, -20:20].astype(np.float32)
    t = texture_mask(texture, u, v, 6.0, np.random.default_rng(0))
    assert set(np.unique(t).tolist()) == {0.0, 1.0}
    assert 0.1 < t.mean() < 0.9


def test_paste_respects_max_occlusion():
    square = Patch(np.full((10, 10, 3), 200, np.float32), np.ones((10, 10), np.float32), np.array([0, 0, 10, 10]), 0)
    image = np.zeros((40, 40, 3), np.float32)
    boxes, labels, areas = paste_patches(image, [square] * 12, np.random.default_rng(0), max_occlusion=0.0, limit=12)
    overlap = iou(boxes, boxes)
    np.fill_diagonal(overlap, 0)
    assert len(boxes) >= 2 and (overlap == 0).all()
    np.testing.assert_array_equal(areas, 100)

    boxes, _, areas = paste_patches(image, [square] * 12, np.random.default_rng(1), max_occlusion=0.5, limit=12)
    assert (areas >= 50).all() and (areas <= 100).all()


def test_split_indices_are_disjoint_and_sized():
    train, test = split_indices(101, 0.2, seed=3)
    assert len(test) == 20 and len(train) == 81
    assert not set(train) & set(test) and set(train) | set(test) == set(range(101))
    with pytest.raises(ValueError):
        split_indices(10, 1.0, seed=0)


def _check_coco(out: Path, num_images: int, class_names) -> dict:
    from pycocotools.coco import COCO

    everything = json.loads((out / "annotations.json").read_text())
    train = json.loads((out / "train.json").read_text())
    test = json.loads((out / "test.json").read_text())
    assert [c["name"] for c in everything["categories"]] == list(class_names)
    assert [c["id"] for c in everything["categories"]] == list(range(1, len(class_names) + 1))
    ids = [im["id"] for im in everything["images"]]
    assert len(ids) == num_images == len(set(ids))
    train_ids, test_ids = {im["id"] for im in train["images"]}, {im["id"] for im in test["images"]}
    assert not train_ids & test_ids and train_ids | test_ids == set(ids)
    assert len(train["annotations"]) + len(test["annotations"]) == len(everything["annotations"])
    for split, split_ids in ((train, train_ids), (test, test_ids)):
        assert {a["image_id"] for a in split["annotations"]} <= split_ids

    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == num_images and len(coco.getCatIds()) == len(class_names)
    for image in everything["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert 2 <= len(anns) <= 6
        assert image["labels"] == sorted({a["category_id"] for a in anns})
        for a in anns:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= image["width"] + 0.02 and y + h <= image["height"] + 0.02
            assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h + 1
        decoded = cv2.imread(str(out / "images" / image["file_name"]))
        assert decoded is not None and decoded.shape == (image["height"], image["width"], 3)
    return everything


def test_synthesize_writes_a_coco_dataset_independent_of_workers(tmp_path):
    one = synthesize(tmp_path / "one", 12, seed=5, size=64, workers=1, progress=False)
    synthesize(tmp_path / "two", 12, seed=5, size=64, workers=2, progress=False)
    synthesize(tmp_path / "other", 12, seed=6, size=64, workers=1, progress=False)
    assert one["images"] == 12 and one["train_images"] == 10 and one["test_images"] == 2
    assert one["objects"] == sum(one["objects_per_class"].values())
    _check_coco(tmp_path / "one", 12, SYNTH_CLASSES)
    for name in ["annotations.json", "train.json", "test.json"] + [f"images/{i:06d}.jpg" for i in range(12)]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    first = "images/000000.jpg"
    assert (tmp_path / "one" / first).read_bytes() != (tmp_path / "other" / first).read_bytes()
    assert not list((tmp_path / "one").rglob("*.tmp"))


def test_synthesize_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError):
        synthesize(tmp_path, 4, min_objects=3, max_objects=2, progress=False)
    with pytest.raises(ValueError):
        synthesize(tmp_path, 4, max_scale=1.5, progress=False)
    with pytest.raises(ValueError):
        synthesize(tmp_path, 0, progress=False)
    with pytest.raises(FileNotFoundError):
        synthesize(tmp_path, 4, sprites=tmp_path / "missing", progress=False)


def _write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


@pytest.fixture
def sprite_folders(tmp_path):
    rng = np.random.default_rng(0)
    sprites, backgrounds = tmp_path / "sprites", tmp_path / "backgrounds"
    for k, name in enumerate(["apple", "boat", "cup"]):
        for j in range(3):
            colour = np.zeros((24, 20, 3), np.uint8)
            colour[:] = (60 * k + 40, 80 + 30 * j, 200 - 50 * k)
            _write_image(sprites / name / f"{j}.jpg", colour)
    rgba = np.zeros((16, 16, 4), np.uint8)
    cv2.circle(rgba, (8, 8), 6, (0, 0, 255, 255), -1)
    _write_image(sprites / "cup" / "round.png", rgba)
    (sprites / "empty").mkdir()
    _write_image(backgrounds / "a.jpg", rng.integers(0, 255, (120, 90, 3), dtype=np.uint8))
    _write_image(backgrounds / "nested" / "b.png", rng.integers(0, 255, (60, 200, 3), dtype=np.uint8))
    return sprites, backgrounds


def test_sprite_bank_reads_classes_and_alpha(sprite_folders):
    sprites, backgrounds = sprite_folders
    bank = SpriteBank.from_folder(sprites)
    assert bank.class_names == ("apple", "boat", "cup") and len(bank) == 10
    assert sum(im.shape[2] == 4 for im in bank.images) == 1
    patch = bank.sample(np.random.default_rng(0), 12.0)
    assert max(patch.rgb.shape[:2]) == 12 and patch.alpha.max() <= 1 and patch.alpha.min() >= 0
    assert len(BackgroundBank.from_folder(backgrounds)) == 2
    with pytest.raises(ValueError):
        SpriteBank.from_folder(sprites / "empty")


def test_sprite_scenes_on_photo_backgrounds(sprite_folders, tmp_path):
    sprites, backgrounds = sprite_folders
    out = tmp_path / "out"
    summary = synthesize(out, 8, seed=1, size=64, sprites=sprites, backgrounds=backgrounds, progress=False)
    assert summary["classes"] == 3 and set(summary["objects_per_class"]) == {"apple", "boat", "cup"}
    _check_coco(out, 8, ("apple", "boat", "cup"))
    again = synthesize(tmp_path / "again", 8, seed=1, size=64, sprites=sprites, backgrounds=backgrounds, progress=False)
    assert again["objects"] == summary["objects"]
    assert (out / "images/000003.jpg").read_bytes() == (tmp_path / "again" / "images/000003.jpg").read_bytes()
    # Either source alone works too.
    image, boxes, labels = render_scene(0, 64, backgrounds=BackgroundBank.from_folder(backgrounds))
    assert image.shape == (64, 64, 3) and labels.max() < len(SYNTH_CLASSES)
    image, boxes, labels = render_scene(0, 64, sprites=SpriteBank.from_folder(sprites))
    assert labels.max() < 3


@needs_shared_data("cifar10_test_subset/test", "coco128/train2017")
def test_sprite_scenes_from_shared_data(tmp_path):
    cifar, coco = SHARED_DATA / "cifar10_test_subset" / "test", SHARED_DATA / "coco128" / "train2017"
    summary = synthesize(tmp_path, 6, seed=0, sprites=cifar, backgrounds=coco, progress=False)
    assert summary["classes"] == 10 and "cat" in summary["objects_per_class"]
    _check_coco(tmp_path, 6, sorted(p.name for p in cifar.iterdir() if p.is_dir()))


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "scenes"
    args = ["synth", "--out", str(out), "--images", "20", "--seed", "3", "--size", "64", "--json", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 20 and summary["test_images"] == 4
    _check_coco(out, 20, SYNTH_CLASSES)
    assert main(["synth", "--out", str(out), "--images", "4", "--min-objects", "5", "--max-objects", "3"]) == 2


def _crop_features(num_scenes: int):
    """Object crops of in-memory scenes as (hue histogram of the saturated pixels, HOG, label, scene index)."""
    hog = cv2.HOGDescriptor((32, 32), (16, 16), (8, 8), (8, 8), 9)
    colour, gradient, labels, scenes = [], [], [], []
    for i in range(num_scenes):
        image, boxes, box_labels = render_scene(1000 + i)
        for box, label in zip(boxes, box_labels, strict=True):
            x0, y0 = np.floor(box[:2]).astype(int)
            x1, y1 = np.ceil(box[2:]).astype(int)
            crop = cv2.resize(image[y0:y1, x0:x1], (32, 32), interpolation=cv2.INTER_AREA)
            hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
            saturated = (hsv[..., 1] > 90).astype(np.uint8)
            hist = cv2.calcHist([hsv], [0], saturated, [18], [0, 180]).ravel()
            colour.append(hist / max(hist.sum(), 1.0))
            gradient.append(hog.compute(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)).ravel())
            labels.append(label)
            scenes.append(i)
    return np.stack(colour), np.stack(gradient), np.array(labels), np.array(scenes)


@pytest.mark.slow
def test_classes_are_separable_but_not_by_colour_alone():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    colour, gradient, labels, scenes = _crop_features(100)
    train = scenes % 2 == 0

    def accuracy(features):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        model.fit(features[train], labels[train])
        return float((model.predict(features[~train]) == labels[~train]).mean())

    colour_only = accuracy(colour)
    both = accuracy(np.hstack([colour, gradient]))
    chance = 1 / len(SYNTH_CLASSES)
    # Each colour family is shared by two classes, so colour alone tops out near 50%.
    assert both > 0.65, both
    assert 2 * chance < colour_only < both - 0.15, (colour_only, both)


def test_synthesize_refuses_a_folder_of_someone_elses_files(tmp_path, capsys):
    """`synth --out` rewrites only a dataset that objcrop synth wrote; a user's files are never replaced."""
    user = tmp_path / "mine"
    (user / "images").mkdir(parents=True)
    photo = user / "images" / "000001.jpg"
    photo.write_bytes(b"my holiday photo")
    notes = user / "notes.txt"
    notes.write_text("keep me")
    argv = ["synth", "--out", str(user), "--images", "4", "--size", "64", "--no-progress"]
    assert main(argv) == 2
    assert str(photo) in capsys.readouterr().err
    assert photo.read_bytes() == b"my holiday photo" and not (user / "annotations.json").exists()

    photo.unlink()
    (user / "train.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match=r"train\.json was not written by objcrop synth"):
        synthesize(user, 4, size=64, progress=False)
    assert (user / "train.json").read_text() == '{"mine": true}'

    (user / "train.json").unlink()  # no clash left: synth writes next to the user's other files
    synthesize(user, 4, size=64, progress=False)
    assert notes.read_text() == "keep me" and (user / "images" / "000003.jpg").is_file()
    synthesize(user, 4, size=64, seed=1, progress=False)  # its own dataset is rewritten
    assert json.loads((user / "annotations.json").read_text())["info"]["seed"] == 1


def test_synthesize_rewrites_a_dataset_killed_before_its_json(tmp_path):
    """The marker goes first, so images of an interrupted run are known to be synth's."""
    out = tmp_path / "scenes"
    synthesize(out, 3, size=64, progress=False)
    for name in ("annotations.json", "train.json", "test.json"):
        (out / name).unlink()
    synthesize(out, 3, size=64, progress=False)
    older = tmp_path / "older"  # a dataset of a version without the marker: its annotations.json proves it
    synthesize(older, 3, size=64, progress=False)
    (older / ".objcrop-synth").unlink()
    synthesize(older, 3, size=64, seed=2, progress=False)
    assert json.loads((older / "train.json").read_text())["info"]["seed"] == 2
