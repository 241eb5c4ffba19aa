"""Faster R-CNN + FPN on timm CNNs: weights by timm's names, stage freezing, norms; ViTs refused."""

import json

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from objcrop.evaluate.detection_model import backbone_weights, build_detector
from objcrop.ssl.backbones import build_backbone, trunk_weights

timm = pytest.importorskip("timm")

torch.set_num_threads(1)

CNN = "timm:test_resnet"


def _stage(name: str) -> str:
    return name.split(".")[0]


def test_exported_timm_cnn_lands_in_the_fpn_body_and_trains(tmp_path):
    trunk, _ = build_backbone(CNN)
    weights = trunk_weights(trunk)
    weights["conv1.0.weight"].fill_(0.123)
    weights["layer4.0.bn1.running_mean"].fill_(0.5)
    path = tmp_path / "r.pth"
    torch.save(weights, path)
    (tmp_path / "r.pth.json").write_text(json.dumps({"arch": CNN, "small_images": False}))
    loaded, arch = backbone_weights(path)
    assert arch == CNN  # read from the sidecar, so 'objcrop detect --weights r.pth' needs no --arch

    model = build_detector(arch, 2, weights=loaded, min_size=64, max_size=96, proposals_train=50, rois_per_image=32)
    body = model.backbone.body.model
    assert torch.all(body.conv1[0].weight == 0.123)
    assert isinstance(body.layer4[0].bn1, FrozenBatchNorm2d) and torch.all(body.layer4[0].bn1.running_mean == 0.5)
    trained = {_stage(n) for n, p in body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}  # trainable_layers=3, torchvision's default
    assert [m.shape[-1] for m in model.backbone(torch.zeros(1, 3, 64, 64)).values()] == [16, 8, 4, 2, 1]

    torch.manual_seed(0)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
    losses = model.train()([torch.rand(3, 64, 80)], [target])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert body.layer4[0].conv1.weight.grad is not None and body.conv1[0].weight.grad is None


def test_bn_protocol_and_stage_counts_on_a_timm_cnn():
    model = build_detector(CNN, 2, trainable_layers=2, norm="bn", min_size=64, max_size=96)
    body = model.backbone.body.model
    assert type(body.layer4[0].bn1) is torch.nn.BatchNorm2d and body.layer4[0].bn1.weight.requires_grad
    assert isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)  # frozen stages keep their statistics
    everything = build_detector(CNN, 2, trainable_layers=5, norm="bn").backbone.body.model
    assert all(p.requires_grad for p in everything.parameters())
    nothing = build_detector(CNN, 2, trainable_layers=0).backbone.body.model
    assert not any(p.requires_grad for p in nothing.parameters())


def test_convnext_stages_are_counted_from_the_last():
    body = build_detector("timm:test_convnext", 2, trainable_layers=2).backbone.body.model
    assert {".".join(n.split(".")[:2]) for n, p in body.named_parameters() if p.requires_grad} == {
        "stages.2",
        "stages.3",
    }


def test_vits_and_weights_of_another_model_are_refused():
    with pytest.raises(ValueError, match="timm:test_vit is a vision transformer: .*ViTDet-style neck"):
        build_detector("timm:test_vit", 2)
    other, _ = build_backbone("timm:test_convnext")
    with pytest.raises(ValueError, match="weights in x.pth do not fit timm:test_resnet"):
        build_detector(CNN, 2, weights=trunk_weights(other), weights_source="weights in x.pth")
