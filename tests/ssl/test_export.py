"""Backbone export: torchvision state dicts and Detectron2 pickles in MoCo's converter layout."""

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from objcrop.cli import main
from objcrop.data.synth import synthesize
from objcrop.io import atomic_torch_save
from objcrop.ssl.backbone_io import backbone_from_checkpoint
from objcrop.ssl.base import build_method
from objcrop.ssl.config import DEFAULTS, load_config
from objcrop.ssl.export import export_detectron2, export_torchvision, to_detectron2_names
from objcrop.ssl.trainer import pretrain
from tests.conftest import tiny_method_config


def moco_converter_name(k: str) -> str:
    """The renaming in MoCo's ``detection/convert-pretrain-to-detectron2.py`` (after the encoder prefix)."""
    if "layer" not in k:
        k = "stem." + k
    for t in [1, 2, 3, 4]:
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    return k


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_names_follow_the_moco_converter(arch):
    with torch.device("meta"):
        names = [k for k in torchvision.models.get_model(arch).state_dict() if not k.startswith("fc.")]
    assert [to_detectron2_names(k) for k in names] == [moco_converter_name(k) for k in names]
    converted = {to_detectron2_names(k) for k in names}
    assert {"stem.conv1.weight", "stem.conv1.norm.weight", "res2.0.conv1.weight", "res5.1.conv2.norm.bias"} <= converted
    if arch == "resnet50":
        assert {"res2.0.shortcut.weight", "res2.0.shortcut.norm.running_var", "res4.5.conv3.norm.running_mean"} <= (
            converted
        )


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint: one MoCo step on synthetic scenes, ResNet-18 with the normal stem."""
    tmp = tmp_path_factory.mktemp("export")
    synthesize(tmp / "scenes", num_images=20, seed=2, size=40, progress=False)
    settings = {
        "data.annotations": tmp / "scenes" / "train.json",
        "data.images": tmp / "scenes" / "images",
        "crops.size": 32,
        "method.backbone": "resnet18",
        "method.dim": 16,
        "method.queue_size": 64,
        "optim.batch_size": 8,
        "optim.max_steps": 1,
        "train.out": tmp / "run",
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.workers": 0,
        "train.threads": 1,
        "train.tensorboard": False,
        "train.progress": False,
    }
    threads = torch.get_num_threads()
    try:
        result = pretrain(load_config(None, [f"{k}={v}" for k, v in settings.items()]))
    finally:
        torch.set_num_threads(threads)
    return Path(result.checkpoint)


def test_torchvision_export_loads_into_torchvision_resnet(trained_checkpoint, tmp_path):
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "r18.pth")]) == 0
    weights = torch.load(tmp_path / "r18.pth", weights_only=True)
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    trained = torch.load(trained_checkpoint, weights_only=True)["model"]
    for name, value in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, trained[f"query_encoder.backbone.{name}"]), name
    sidecar = json.loads((tmp_path / "r18.pth.json").read_text())
    assert sidecar["arch"] == "resnet18" and sidecar["small_images"] is False


def test_detectron2_export_holds_the_backbone_under_detectron2_names(trained_checkpoint, tmp_path):
    out = tmp_path / "r18.pkl"
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--to", "detectron2", "--out", str(out)]) == 0
    with open(out, "rb") as f:  # our own file: the test may unpickle it
        payload = pickle.load(f)
    assert payload["matching_heuristics"] is True and payload["__author__"] == "objcrop"
    model = payload["model"]
    weights = backbone_from_checkpoint(trained_checkpoint)
    expected = {moco_converter_name(k): v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    assert model.keys() == expected.keys()
    named = {"stem.conv1.weight", "stem.conv1.norm.running_mean", "res3.0.shortcut.weight", "res3.0.shortcut.norm.bias"}
    assert named <= model.keys()
    for name, value in expected.items():
        assert model[name].shape == tuple(value.shape) and (model[name] == value.numpy()).all(), name
    assert model["stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert [p.name for p in tmp_path.iterdir()] == ["r18.pkl"]  # no temp file left behind


@pytest.mark.parametrize(
    ("method", "settings", "prefix"),
    [
        ("byol", {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}, "online.backbone."),
        ("densecl", {"dim": 16, "hidden_dim": 32, "queue_size": 64}, "query_encoder.backbone."),
    ],
)
def test_every_method_exports_its_online_backbone(tmp_path, method, settings, prefix):
    config = copy.deepcopy(DEFAULTS)
    config["method"] = {"name": method, "backbone": "resnet18", "separate_heads": True, **settings}
    model = build_method(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # online and momentum copies differ, so a wrong pick would show
    state = {"model": model.state_dict(), "step": 0, "config": json.dumps(config)}
    atomic_torch_save(state, tmp_path / "ckpt-00000000.pt")
    out = export_torchvision(tmp_path / "ckpt-00000000.pt", tmp_path / "b.pth")
    weights = torch.load(out, weights_only=True)
    backbone = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    assert weights.keys() == backbone.keys()
    assert all(torch.equal(weights[k], backbone[k]) for k in weights)


def test_small_image_stem_refuses_detectron2(tmp_path):
    config = copy.deepcopy(DEFAULTS)
    config["method"] = {"name": "moco", "backbone": "resnet18", "small_images": True, "dim": 16, "queue_size": 64}
    state = {"model": build_method(config).state_dict(), "step": 0, "config": json.dumps(config)}
    atomic_torch_save(state, tmp_path / "ckpt-00000000.pt")
    with pytest.raises(ValueError, match="small-image stem has no Detectron2 equivalent"):
        export_detectron2(tmp_path / "ckpt-00000000.pt", tmp_path / "b.pkl")
    assert not (tmp_path / "b.pkl").exists()
    export_torchvision(tmp_path / "ckpt-00000000.pt", tmp_path / "b.pth")
    assert json.loads((tmp_path / "b.pth.json").read_text())["small_images"] is True


def test_cli_reports_a_damaged_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt-00000001.pt"), "--out", str(tmp_path / "b.pth")]) == 2
    assert "ckpt-00000001.pt is damaged or not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "b.pth").exists()


@pytest.fixture(scope="module")
def timm_vit_checkpoint(tmp_path_factory) -> Path:
    """Two MoCo steps of ``pretrain`` with timm's test ViT (patch 16) on 32 px views."""
    pytest.importorskip("timm")
    tmp = tmp_path_factory.mktemp("export-timm")
    synthesize(tmp / "scenes", num_images=8, seed=3, size=40, progress=False)
    settings = {
        "data.annotations": tmp / "scenes" / "train.json",
        "data.images": tmp / "scenes" / "images",
        "crops.size": 32,
        "method.backbone": "timm:test_vit",
        "method.dim": 16,
        "method.hidden_dim": 32,
        "method.queue_size": 16,
        "optim.batch_size": 4,
        "optim.max_steps": 2,
        "train.out": tmp / "run",
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.workers": 0,
        "train.threads": 1,
        "train.tensorboard": False,
        "train.progress": False,
    }
    threads = torch.get_num_threads()
    try:
        result = pretrain(load_config(None, [f"{k}={v}" for k, v in settings.items()]))
    finally:
        torch.set_num_threads(threads)
    return Path(result.checkpoint)


def test_timm_export_loads_into_timm_create_model(timm_vit_checkpoint, tmp_path):
    import timm

    out = tmp_path / "vit.pth"
    assert main(["export", "--checkpoint", str(timm_vit_checkpoint), "--out", str(out)]) == 0
    weights = torch.load(out, weights_only=True)
    model = timm.create_model("test_vit", pretrained=False)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    trained = torch.load(timm_vit_checkpoint, weights_only=True)["model"]
    for name, value in weights.items():
        assert torch.equal(value, trained[f"query_encoder.backbone.model.{name}"]), name
    sidecar = json.loads((tmp_path / "vit.pth.json").read_text())
    assert sidecar["arch"] == "timm:test_vit" and sidecar["small_images"] is False
    with pytest.raises(ValueError, match="timm:test_vit has no Detectron2 layout"):
        export_detectron2(timm_vit_checkpoint, tmp_path / "vit.pkl")
    assert not (tmp_path / "vit.pkl").exists()


@pytest.mark.parametrize("method", ["byol", "densecl"])
def test_timm_cnn_exports_from_every_method(tmp_path, method):
    import timm

    config = copy.deepcopy(DEFAULTS)
    settings = {"byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32}}
    config["method"] = {"name": method, "backbone": "timm:test_resnet", **settings.get(method, {"queue_size": 16})}
    model = build_method(config)
    state = {"model": model.state_dict(), "step": 0, "config": json.dumps(config)}
    atomic_torch_save(state, tmp_path / "ckpt-00000000.pt")
    weights = torch.load(export_torchvision(tmp_path / "ckpt-00000000.pt", tmp_path / "b.pth"), weights_only=True)
    reference = timm.create_model("test_resnet", pretrained=False)
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert all(torch.equal(v, model.backbone.model.state_dict()[k]) for k, v in weights.items())


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """A tiny MoCo checkpoint (ResNet-18, normal stem, untrained): enough to export, in a second."""
    config = tiny_method_config("moco", small_images=False)
    state = {"model": build_method(config).state_dict(), "step": 0, "config": json.dumps(config)}
    atomic_torch_save(state, tmp_path / "ckpt-00000000.pt")
    return tmp_path / "ckpt-00000000.pt"


def _export(checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["export", "--checkpoint", str(checkpoint), *extra, "--out", str(out)])


@pytest.mark.parametrize(
    ("name", "foreign"),
    [("b.pth", "b.pth"), ("b.pth", "b.pth.json"), ("b.pkl", "b.pkl")],
    ids=["state-dict", "sidecar", "detectron2"],
)
def test_export_refuses_to_replace_a_file_it_did_not_write(small_checkpoint, tmp_path, capsys, name, foreign):
    path = tmp_path / foreign
    path.write_bytes(b"the user's own file")
    extra = ("--to", "detectron2") if name.endswith(".pkl") else ()
    assert _export(small_checkpoint, tmp_path / name, *extra) == 2
    err = capsys.readouterr().err
    assert f"{path} was not written by objcrop" in err and "choose another --out" in err
    assert path.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"ckpt-00000000.pt", foreign})  # nothing written


def test_export_refuses_a_plain_torch_state_dict_and_a_foreign_pickle(small_checkpoint, tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "b.pth")  # a state dict without objcrop's marker
    before = (tmp_path / "b.pth").read_bytes()
    with pytest.raises(ValueError, match="b.pth was not written by objcrop"):
        export_torchvision(small_checkpoint, tmp_path / "b.pth")
    assert (tmp_path / "b.pth").read_bytes() == before
    with open(tmp_path / "b.pkl", "wb") as f:
        pickle.dump({"model": {}, "__author__": "MOCO", "matching_heuristics": True}, f)
    before = (tmp_path / "b.pkl").read_bytes()
    with pytest.raises(ValueError, match="b.pkl was not written by objcrop"):
        export_detectron2(small_checkpoint, tmp_path / "b.pkl")
    assert (tmp_path / "b.pkl").read_bytes() == before


def test_export_replaces_its_own_files(small_checkpoint, tmp_path):
    out = tmp_path / "b.pth"
    for _ in range(2):  # the second export replaces the first one's .pth and .pth.json
        assert _export(small_checkpoint, out) == 0
    weights = torch.load(out, weights_only=True)
    torchvision.models.resnet18().load_state_dict(weights, strict=False)
    assert weights._metadata == {"__objcrop__": {"written_by": "objcrop"}}  # the marker: not a key
    assert json.loads((tmp_path / "b.pth.json").read_text())["written_by"] == "objcrop"
    for _ in range(2):
        assert _export(small_checkpoint, tmp_path / "b.pkl", "--to", "detectron2") == 0
    with open(tmp_path / "b.pkl", "rb") as f:  # our own file: the test may unpickle it
        assert pickle.load(f)["__author__"] == "objcrop"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pkl", "b.pth", "b.pth.json", "ckpt-00000000.pt"]
