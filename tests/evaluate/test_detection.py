"""Detection transfer: weights loading, data, schedule, a smoke run on COCO images (AP: test_detection_metrics.py)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d

from objcrop.cli import main
from objcrop.data.coco import read_coco
from objcrop.data.records import Record, Records
from objcrop.evaluate.detection import DetectionConfig, detection_lr_lambda, predict, run_detection
from objcrop.evaluate.detection_data import DetectionDataset, collate_detection
from objcrop.evaluate.detection_metrics import (
    METRICS,
    coco_evaluate,
    ground_truth_from_records,
)
from objcrop.evaluate.detection_model import backbone_weights, build_detector
from objcrop.ssl.backbones import build_backbone
from tests.conftest import SHARED_DATA, needs_shared_data

DATA = SHARED_DATA


def test_lr_schedule_warms_up_then_steps():
    factor = detection_lr_lambda(total_iters=90, warmup_iters=10, warmup_factor=0.001, steps=(2 / 3, 8 / 9), gamma=0.1)
    assert factor(0) == pytest.approx(0.001)
    assert factor(5) == pytest.approx(0.5005)
    assert factor(10) == factor(59) == 1.0
    assert factor(60) == pytest.approx(0.1)
    assert factor(80) == pytest.approx(0.01)


def _marked_resnet18_state() -> dict[str, torch.Tensor]:
    trunk, _ = build_backbone("resnet18")
    state = trunk.state_dict()
    state["conv1.weight"].fill_(0.123)
    state["layer4.1.bn2.running_mean"].fill_(0.5)
    return state


def test_torchvision_state_dict_lands_in_the_detector_body(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_marked_resnet18_state(), path)
    weights, arch = backbone_weights(path)
    assert arch is None
    model = build_detector("resnet18", 2, weights=weights, min_size=64, max_size=96)
    body = model.backbone.body
    assert torch.all(body.conv1.weight == 0.123)
    assert isinstance(body.layer4[1].bn2, FrozenBatchNorm2d)
    assert torch.all(body.layer4[1].bn2.running_mean == 0.5)
    trained = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}  # trainable_layers=3, torchvision's default


def test_objcrop_checkpoint_gives_its_backbone_and_arch(tmp_path):
    from objcrop.ssl.moco import MoCoV2

    method = MoCoV2(backbone="resnet18", queue_size=8, dim=8)
    with torch.no_grad():
        method.backbone.conv1.weight.fill_(-0.25)
    config = {"method": {"name": "moco", "backbone": "resnet18", "queue_size": 8, "dim": 8}}
    path = tmp_path / "ckpt-00000001.pt"
    torch.save({"model": method.state_dict(), "step": 1, "config": json.dumps(config)}, path)
    weights, arch = backbone_weights(path)
    assert arch == "resnet18"
    model = build_detector(arch, 3, weights=weights, trainable_layers=5, min_size=64, max_size=96)
    assert torch.all(model.backbone.body.conv1.weight == -0.25)
    assert all(p.requires_grad for p in model.backbone.body.parameters())


def test_weights_of_another_architecture_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="another architecture"):
        build_detector("resnet34", 2, weights=_marked_resnet18_state())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read weights"):
        backbone_weights(bad)


def test_bn_protocol_trains_norms_in_backbone_fpn_and_box_head():
    model = build_detector("resnet18", 2, trainable_layers=2, norm="bn", min_size=64, max_size=96)
    body = model.backbone.body
    assert isinstance(body.layer4[0].bn1, torch.nn.BatchNorm2d) and body.layer4[0].bn1.weight.requires_grad
    assert isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)  # frozen stages keep their statistics
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.fpn.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.roi_heads.box_head.modules())


def test_the_auto_box_head_is_4conv1fc_with_bn_and_2fc_frozen():
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead

    assert isinstance(build_detector("resnet18", 2, norm="bn").roi_heads.box_head, FastRCNNConvFCHead)
    assert isinstance(build_detector("resnet18", 2, norm="frozen").roi_heads.box_head, TwoMLPHead)


def test_box_head_anchor_sizes_and_fpn_channels_are_chosen_and_checked():
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead

    light = build_detector("resnet18", 2, norm="bn", box_head="2fc", fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128))
    assert isinstance(light.roi_heads.box_head, TwoMLPHead)
    assert isinstance(light.backbone.body.layer4[0].bn1, torch.nn.BatchNorm2d)  # the norm is still trained
    assert light.backbone.out_channels == 32 and light.rpn.head.conv[0][0].in_channels == 32
    assert light.rpn.anchor_generator.sizes == ((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))
    heavy = build_detector("resnet18", 2, norm="frozen", box_head="4conv1fc")
    assert isinstance(heavy.roi_heads.box_head, FastRCNNConvFCHead)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in heavy.roi_heads.box_head.modules())
    assert heavy.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))  # torchvision's
    with pytest.raises(ValueError, match="box_head"):
        build_detector("resnet18", 2, box_head="3fc")
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_detector("resnet18", 2, anchor_sizes=(16, 32, 64))
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_detector("resnet18", 2, anchor_sizes=(16, 32, 64, 128, float("nan")))


def test_new_settings_at_their_defaults_keep_the_resume_key():
    key = DetectionConfig().resume_key()
    assert not {"box_head", "anchor_sizes", "fpn_channels"} & set(key)  # checkpoints of older runs still resume
    changed = DetectionConfig(box_head="2fc", fpn_channels=64).resume_key()
    assert changed == {**key, "box_head": "2fc", "fpn_channels": 64}


def test_dataset_flips_image_and_boxes_and_skips_unreadable(tmp_path):
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, :10] = 255  # bright left band
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    recs = [
        Record("a.png", 40, 30, np.array([[0, 5, 10, 25]], np.float32), np.array([1], np.int32)),
        Record("broken.png", 40, 30),
    ]
    records = Records.from_records(recs, ["x", "y"], root=str(tmp_path))
    image, target = DetectionDataset(records)[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert target["labels"].tolist() == [2]
    assert target["boxes"].tolist() == [[0, 5, 10, 25]]
    flipped, ftarget = DetectionDataset(records, hflip_prob=1.0)[0]
    assert torch.equal(flipped, image.flip(-1))
    assert ftarget["boxes"].tolist() == [[30, 5, 40, 25]]
    images, targets, dropped = collate_detection([DetectionDataset(records)[i] for i in range(2)])
    assert len(images) == len(targets) == 1 and dropped == 1


class _WholeImageDetector(torch.nn.Module):
    """Detects one object of torchvision label 2 covering each whole image."""

    def forward(self, images):
        assert all(im.dtype == torch.float32 and float(im.max()) <= 1.0 for im in images)
        return [
            {
                "boxes": torch.tensor([[0.0, 0.0, im.shape[2], im.shape[1]]]),
                "scores": torch.tensor([0.5]),
                "labels": torch.tensor([2]),
            }
            for im in images
        ]


def test_predict_maps_outputs_to_image_ids_and_class_indices(tmp_path):
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 50))):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    recs = [Record("a.png", 40, 30, image_id=5), Record("missing.png", 10, 10, image_id=6), Record("b.png", 20, 50)]
    records = Records.from_records(recs, ["x", "y"], root=str(tmp_path))
    dets, seen, skipped = predict(_WholeImageDetector(), DetectionDataset(records), batch_size=2, progress=False)
    assert seen.tolist() == [5, 2] and skipped == 1
    assert dets.image_ids.tolist() == [5, 2] and dets.labels.tolist() == [1, 1]
    assert dets.boxes.tolist() == [[0, 0, 40, 30], [0, 0, 20, 50]]


def _square_scenes(folder: Path, count: int, seed: int, size: int = 64) -> Records:
    """Dark noise with one bright square of 40-70 % of the side per image (one class)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(count):
        pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        side = int(rng.integers(int(size * 0.4), int(size * 0.7)))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        pixels[y : y + side, x : x + side] = rng.integers(150, 256, 3)
        Image.fromarray(pixels).save(folder / f"{seed}-{i}.png")
        box = np.array([[x, y, x + side, y + side]], np.float32)
        recs.append(Record(f"{seed}-{i}.png", size, size, box, np.array([0], np.int32), image_id=i + 1))
    return Records.from_records(recs, ["square"], root=str(folder))


@pytest.mark.slow
def test_a_few_dozen_cpu_iterations_learn_to_detect_big_squares(tmp_path):
    torch.set_num_threads(1)
    train, test = _square_scenes(tmp_path / "img", 32, seed=0), _square_scenes(tmp_path / "img", 16, seed=1)
    # Random init needs trained BatchNorm (frozen: diverges); torchvision's anchors fit these 26-45 px squares
    # (4x smaller ones sit on coarser maps: AP50 0.15 instead of 1.0 with the same schedule).
    config = DetectionConfig(
        arch="resnet18", trainable_layers=5, norm="bn", box_head="2fc", fpn_channels=64, min_size=(64,), max_size=64,
        proposals_train=64, proposals_test=32, rois_per_image=16, max_iters=40, batch_size=8, lr=0.01,
        warmup_iters=5, workers=0, device="cpu",
    )  # fmt: skip
    torch.manual_seed(config.seed)
    untrained = build_detector("resnet18", 1, trainable_layers=5, norm="bn", box_head="2fc", fpn_channels=64,
                               min_size=64, max_size=64, proposals_test=32)  # fmt: skip
    dets, seen, _ = predict(untrained, DetectionDataset(test), progress=False, device="cpu")
    before = coco_evaluate(ground_truth_from_records(test), dets, image_ids=seen)["AP50"]

    result = run_detection(train, test, config, tmp_path / "run", progress=False)
    assert result.train.iterations == 40 and result.test_images == 16
    assert before < 0.1
    assert result.metrics["AP50"] > 0.5  # measured 1.0 (AP 0.65)


@pytest.mark.slow
@needs_shared_data("coco_tiny/annotations", "coco128/annotations")
def test_cli_smoke_run_on_coco_images_trains_scores_and_resumes(tmp_path, capsys):
    tiny, c128 = DATA / "coco_tiny", DATA / "coco128"
    torch.set_num_threads(1)
    weights = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18")[0].state_dict(), weights)
    args = [
        "detect", "--weights", str(weights), "--arch", "resnet18",
        "--train-annotations", str(tiny / "annotations" / "instances_train2017.json"),
        "--train-images", str(tiny / "train2017"),
        "--test-annotations", str(c128 / "annotations" / "instances_train2017.json"),
        "--test-images", str(c128 / "train2017"),
        "--max-train-images", "8", "--max-test-images", "3", "--epochs", "1", "--batch-size", "2",
        "--min-size", "160", "--max-size", "224", "--proposals-train", "128", "--proposals-test", "100",
        "--rois-per-image", "64", "--warmup-iters", "2", "--workers", "0", "--out", str(tmp_path / "run"), "--json",
    ]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The official protocol's size ranges use the segment areas of the scored images' non-crowd objects:
    # a size gets -1 exactly when none of its objects is among them.
    annotations_json = c128 / "annotations" / "instances_train2017.json"
    scored = set(read_coco(annotations_json, c128 / "train2017").image_ids[:3].tolist())
    annotations = json.loads(annotations_json.read_text())["annotations"]
    areas = [a["area"] for a in annotations if a["image_id"] in scored and not a["iscrowd"]]
    for name, (lo, hi) in {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, math.inf)}.items():
        assert (result[name] >= 0) == any(lo <= area <= hi for area in areas), name
    assert 0.0 <= result["AP75"] <= result["AP50"] and result["AP"] <= result["AP50"]  # stricter IoU, fewer hits
    assert result["train_iters"] == 4 and result["test_images"] == 3 and np.isfinite(result["final_loss"])
    checkpoint = tmp_path / "run" / "detector.pt"
    written = (checkpoint.stat().st_mtime_ns, hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["AP"] == result["AP"]

    assert main(args) == 0  # resumes the finished run: no more training, same detector, same scores
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["train_iters"] == 4 and again["train_img_per_s"] == 0.0  # not one image trained on again
    assert (checkpoint.stat().st_mtime_ns, hashlib.sha256(checkpoint.read_bytes()).hexdigest()) == written
    assert {k: again[k] for k in METRICS} == {k: result[k] for k in METRICS}
