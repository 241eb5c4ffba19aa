"""Loading a backbone to evaluate: objcrop checkpoints, torchvision state dicts (+ sidecar), random init."""

import json

import pytest
import torch

from objcrop.evaluate.backbone import backbone_info, load_backbone, write_arch_sidecar
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
