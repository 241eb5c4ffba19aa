"""Backbones: torchvision trunks and timm models (``timm:<name>``) for MoCo-v2, BYOL and DenseCL."""

import pytest
import torch

from objcrop.crops.policies import KIND_CODES
from objcrop.ssl.backbones import (
    TimmTrunk,
    build_backbone,
    check_view_size,
    convert_sync_batchnorm,
    load_trunk_weights,
    trunk_weights,
)
from objcrop.ssl.byol import BYOL
from objcrop.ssl.config import ConfigError, load_config
from objcrop.ssl.densecl import DenseCL
from objcrop.ssl.moco import MoCoV2

timm = pytest.importorskip("timm")

torch.set_num_threads(1)

# timm's own test models: a 4-stage ResNet (96 features) and a patch-16 ViT (64 features, one cls token).
CNN, VIT = "timm:test_resnet", "timm:test_vit"
OBJ, SCENE = KIND_CODES["object"], KIND_CODES["scene"]


def _batch(px: int, seed: int = 0, size: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, px, px, generator=g)
    views = [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)]
    return {"views": views, "kinds": torch.tensor([[OBJ, SCENE], [SCENE, OBJ]]).repeat(size // 2, 1)}


@pytest.mark.parametrize(("name", "dim"), [(CNN, 96), (VIT, 64)])
def test_pooled_features_come_from_the_classifier_free_timm_model(name, dim):
    torch.manual_seed(0)
    trunk, feature_dim = build_backbone(name)
    assert isinstance(trunk, TimmTrunk) and feature_dim == dim and trunk.arch == name
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = trunk.eval()(x)
        assert out.shape == (2, dim)
        torch.testing.assert_close(out, trunk.model.forward_head(trunk.model.forward_features(x)))


def test_cnn_dense_map_is_the_last_feature_map():
    trunk, dim = build_backbone(CNN, feature_map=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        dense = trunk.eval()(x)
        assert dense.shape == (2, dim, 2, 3)  # stride 32
        torch.testing.assert_close(dense, trunk.model.forward_features(x))


def test_vit_dense_map_is_the_patch_grid_without_the_cls_token():
    trunk, dim = build_backbone(VIT, feature_map=True)
    assert trunk.model.num_prefix_tokens == 1 and trunk.patch_size == (16, 16)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        dense = trunk.eval()(x)
        tokens = trunk.model.forward_features(x)  # [B, 1 + 2 * 3, D]
    assert dense.shape == (2, dim, 2, 3) and tokens.shape == (2, 7, dim)
    for row in range(2):
        for col in range(3):
            torch.testing.assert_close(dense[:, :, row, col], tokens[:, 1 + 3 * row + col])


def test_vit_of_a_224_config_takes_small_views_with_its_positional_embedding_resampled():
    trunk, _ = build_backbone("timm:vit_tiny_patch16_224", feature_map=True)
    assert trunk.model.pos_embed.shape == (1, 1 + 14 * 14, 192)  # the shape timm.create_model(name) has
    assert trunk(torch.randn(1, 3, 32, 32)).shape == (1, 192, 2, 2)


def test_vit_view_size_must_be_a_multiple_of_the_patch_size():
    trunk, _ = build_backbone(VIT)
    with pytest.raises(ValueError, match=r"timm:test_vit needs inputs .* patch size \(16, 16\), got 36 x 32"):
        trunk(torch.randn(1, 3, 36, 32))
    check_view_size(VIT, 48)
    check_view_size(CNN, 37)  # CNNs take any size
    check_view_size("resnet18", 37)
    with pytest.raises(ValueError, match="multiples of its patch size"):
        check_view_size(VIT, 40)


def test_unknown_names_and_the_small_image_stem_are_refused():
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet5O'.*close matches: timm:resnet50"):
        build_backbone("timm:resnet5O")
    with pytest.raises(ValueError, match="small_images .* keeps timm's stem"):
        build_backbone(CNN, small_images=True)
    with pytest.raises(ValueError, match="or timm:<name>"):
        build_backbone("vgg16")


def test_config_reports_a_bad_timm_backbone_under_method(tmp_path):
    base = [f"data.images={tmp_path}", "method.name=moco"]
    with pytest.raises(ConfigError, match=r"^method(\.backbone)?: .*unknown timm model 'resnet5O'.*timm:resnet50"):
        load_config(None, [*base, "method.backbone=timm:resnet5O"])
    with pytest.raises(ConfigError, match="^method: .*small_images"):
        load_config(None, [*base, f"method.backbone={CNN}", "method.small_images=true"])
    with pytest.raises(ConfigError, match=r"^crops.size: timm:test_vit needs inputs .* got 40 x 40"):
        load_config(None, [*base, f"method.backbone={VIT}", "crops.size=40"])
    config = load_config(None, [*base, f"method.backbone={VIT}", "crops.size=32"])
    assert config["method"]["backbone"] == VIT


def _train(model: torch.nn.Module, px: int, steps: int = 3) -> list[float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = model(_batch(px, seed=step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step(step, steps)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", [CNN, VIT])
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_moco_and_byol_train_on_timm_backbones(name, method):
    torch.manual_seed(0)
    if method == "moco":
        model = MoCoV2(name, dim=16, hidden_dim=32, queue_size=16)
        momentum_copy = model.key_encoder.backbone
    else:
        model = BYOL(name, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
        momentum_copy = model.target.backbone
    before = {k: v.clone() for k, v in trunk_weights(model.backbone).items()}
    target_before = {k: v.clone() for k, v in trunk_weights(momentum_copy).items()}
    losses = _train(model, px=32)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    after, target_after = trunk_weights(model.backbone), trunk_weights(momentum_copy)
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > len(after) // 2  # the online backbone learns ...
    assert any(not torch.equal(v, target_before[k]) for k, v in target_after.items())  # ... and the EMA follows


@pytest.mark.parametrize(("name", "px", "grid"), [(CNN, 64, 2), (VIT, 32, 2)])
def test_densecl_gets_a_dense_map_from_timm_backbones(name, px, grid):
    torch.manual_seed(0)
    model = DenseCL(name, dim=16, hidden_dim=32, queue_size=16)
    batch = _batch(px)
    outputs = model.query_encoder(batch["views"], batch["kinds"])
    dim = model.backbone.feature_dim
    assert outputs[0].features.shape == (4, dim, grid, grid) and outputs[0].grid.shape == (4, 16, grid, grid)
    losses = _train(model, px=px, steps=2)
    assert all(torch.isfinite(torch.tensor(losses))), losses


def test_weights_keep_timm_names_and_load_back_without_the_classifier():
    torch.manual_seed(0)
    full = timm.create_model("test_resnet", pretrained=False)  # with its fc head
    trunk, _ = build_backbone(CNN)
    load_trunk_weights(trunk, full.state_dict(), "full.pth")
    assert trunk_weights(trunk).keys() == {k for k in full.state_dict() if not k.startswith("fc.")}
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in trunk_weights(trunk).items())
    weights = dict(full.state_dict())
    weights.pop("layer1.0.conv1.weight")
    with pytest.raises(ValueError, match=r"full.pth do not fit timm:test_resnet.*layer1.0.conv1.weight"):
        load_trunk_weights(trunk, weights, "full.pth")


def test_sync_batchnorm_keeps_timm_fused_activations():
    trunk, _ = build_backbone("timm:test_efficientnet")
    acts = [type(m.act) for m in trunk.modules() if isinstance(m, timm.layers.BatchNormAct2d)]
    synced = convert_sync_batchnorm(trunk)
    sync_acts = [type(m.act) for m in synced.modules() if isinstance(m, timm.layers.SyncBatchNormAct)]
    assert acts and sync_acts == acts
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())


def test_dense_mode_freezes_what_only_the_pooled_head_uses():
    # ConvNeXt normalises after pooling (head.norm): the dense map gives those weights no gradient, which
    # DDP (find_unused_parameters off) would refuse. Every trainable parameter must get a gradient.
    torch.manual_seed(0)
    model = DenseCL("timm:test_convnext", dim=16, hidden_dim=32, queue_size=16)
    frozen = [k for k, p in model.backbone.model.named_parameters() if not p.requires_grad]
    assert frozen == ["head.norm.weight", "head.norm.bias"]
    model(_batch(64))["loss"].backward()
    assert all(p.grad is not None for p in model.query_encoder.parameters() if p.requires_grad)
    assert set(trunk_weights(model.backbone)) >= {"head.norm.weight", "head.norm.bias"}  # still exported
    pooled, _ = build_backbone("timm:test_convnext")
    assert all(p.requires_grad for p in pooled.parameters())
