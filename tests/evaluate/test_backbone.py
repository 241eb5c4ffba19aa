"""Loading a backbone to evaluate: objcrop checkpoints, torchvision state dicts (+ sidecar), random init."""

import json

import pytest
import torch

from objcrop.evaluate.backbone import backbone_info, load_backbone
from objcrop.ssl.backbone_io import write_arch_sidecar
from objcrop.ssl.backbones import build_backbone
from objcrop.ssl.moco import MoCoV2

torch.set_num_threads(1)

METHOD = {"name": "moco", "backbone": "resnet18", "small_images": True, "dim": 16, "hidden_dim": 32, "queue_size": 64}


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


def test_random_init_is_seeded_and_in_eval_mode():
    a, dim = load_backbone("random:resnet18", small_images=True, seed=3)
    b, _ = load_backbone("random:resnet18", small_images=True, seed=3)
    c, _ = load_backbone("random:resnet18", small_images=True, seed=4)
    assert dim == 512 and not a.training
    assert _same_outputs(a, b) and not _same_outputs(a, c)
    assert a(torch.zeros(2, 3, 16, 16)).shape == (2, 512)
    info = backbone_info("random:resnet18", small_images=True, seed=3)
    assert (info.kind, info.arch, info.small_images, info.seed) == ("random", "resnet18", True, 3)


def test_objcrop_checkpoint_gives_the_query_backbone_and_its_architecture(tmp_path):
    torch.manual_seed(0)
    method = MoCoV2(**{k: v for k, v in METHOD.items() if k != "name"})
    path = tmp_path / "ckpt-00000010.pt"
    torch.save({"model": method.state_dict(), "config": json.dumps({"method": METHOD}), "step": 10}, path)
    net, dim = load_backbone(path)
    assert dim == 512 and _same_outputs(net, method.backbone)
    info = backbone_info(path)
    assert (info.kind, info.arch, info.small_images) == ("checkpoint", "resnet18", True)
    assert info.size == path.stat().st_size and info.mtime_ns == path.stat().st_mtime_ns
    with pytest.raises(ValueError, match="do not pass another"):
        backbone_info(path, arch="resnet50")


def test_state_dict_needs_an_architecture_from_the_flag_or_the_sidecar(tmp_path):
    torch.manual_seed(1)
    trunk, _ = build_backbone("resnet18", small_images=True)
    weights = dict(trunk.state_dict())
    weights["fc.weight"], weights["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)  # a full torchvision dict
    path = tmp_path / "backbone.pth"
    torch.save(weights, path)

    with pytest.raises(ValueError, match="--arch"):
        load_backbone(path)
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(path, arch="resnet18", small_images=False)  # wrong stem: conv1 has another shape
    net, _ = load_backbone(path, arch="resnet18", small_images=True)
    assert _same_outputs(net, trunk)

    write_arch_sidecar(path, "resnet18", True)
    net, _ = load_backbone(path)
    assert _same_outputs(net, trunk)
    assert backbone_info(path).kind == "state_dict"


def test_missing_and_foreign_files_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone(tmp_path / "nope.pth", arch="resnet18")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth"):
        load_backbone(junk, arch="resnet18")
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="tensor.pth"):
        load_backbone(tensor, arch="resnet18")
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("random:resnet7")


def test_timm_state_dict_with_or_without_head_loads_by_sidecar_or_arch(tmp_path):
    timm = pytest.importorskip("timm")
    from objcrop.ssl.backbones import trunk_weights

    a, dim = load_backbone("random:timm:test_vit", seed=3)
    b, _ = load_backbone("random:timm:test_vit", seed=3)
    assert dim == 64 and not a.training and _same_outputs(a, b)

    path = tmp_path / "vit.pth"
    torch.save(trunk_weights(a), path)
    write_arch_sidecar(path, "timm:test_vit", False)
    net, _ = load_backbone(path)
    assert _same_outputs(net, a) and backbone_info(path).arch == "timm:test_vit"

    full = timm.create_model("test_resnet", pretrained=False)  # timm's own file, classifier included
    torch.save(full.state_dict(), tmp_path / "r.pth")
    net, dim = load_backbone(tmp_path / "r.pth", arch="timm:test_resnet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert dim == 96 and torch.allclose(net(x), full.eval().forward_head(full.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match=r"r.pth: weights do not fit timm:test_vit.*check --arch \(timm:test_vit\)"):
        load_backbone(tmp_path / "r.pth", arch="timm:test_vit")


def test_timm_checkpoint_gives_the_query_backbone(tmp_path):
    pytest.importorskip("timm")
    method_config = {"name": "moco", "backbone": "timm:test_vit", "dim": 16, "hidden_dim": 32, "queue_size": 16}
    torch.manual_seed(0)
    method = MoCoV2(**{k: v for k, v in method_config.items() if k != "name"})
    path = tmp_path / "ckpt-00000002.pt"
    torch.save({"model": method.state_dict(), "config": json.dumps({"method": method_config}), "step": 2}, path)
    net, dim = load_backbone(path)
    assert dim == 64 and _same_outputs(net, method.backbone)
    assert (backbone_info(path).arch, backbone_info(path).small_images) == ("timm:test_vit", False)


def test_knn_command_evaluates_an_exported_timm_vit(tmp_path, capsys):
    pytest.importorskip("timm")
    from objcrop.cli import main
    from objcrop.data.synth import synthesize
    from objcrop.ssl.backbones import trunk_weights

    synthesize(tmp_path / "scenes", 16, size=48, progress=False)
    net, _ = load_backbone("random:timm:test_vit", seed=1)
    torch.save(trunk_weights(net), tmp_path / "vit.pth")
    write_arch_sidecar(tmp_path / "vit.pth", "timm:test_vit", False)
    scenes = tmp_path / "scenes"
    argv = ["knn", "--checkpoint", str(tmp_path / "vit.pth"), "--format", "coco", "--images", str(scenes / "images")]
    argv += ["--train-annotations", str(scenes / "train.json"), "--test-annotations", str(scenes / "test.json")]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--k", "3", "--json"]
    assert main([*argv, "--size", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "mAP" and 0 <= out["value"] <= 100
    assert main([*argv, "--size", "40"]) == 2  # not a multiple of the patch size
    assert "timm:test_vit needs inputs whose sides are multiples of its patch size" in capsys.readouterr().err
