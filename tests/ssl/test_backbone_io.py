"""Checkpoints to backbones: the one architecture lookup and the arch sidecar."""

import copy
import json

import pytest
import torch

from objcrop.io import atomic_torch_save
from objcrop.ssl.backbone_io import (
    arch_sidecar,
    checkpoint_arch,
    checkpoint_backbone,
    read_arch_sidecar,
    write_arch_sidecar,
)
from objcrop.ssl.backbones import trunk_weights
from objcrop.ssl.base import build_method
from objcrop.ssl.config import DEFAULTS
from objcrop.ssl.errors import CheckpointError


def config_of(method: dict) -> dict:
    config = copy.deepcopy(DEFAULTS)
    config["method"] = method
    return config


def test_sidecar_round_trip_and_absence(tmp_path):
    weights = tmp_path / "backbone.pth"
    assert read_arch_sidecar(weights) == {}
    assert write_arch_sidecar(weights, "resnet18", True, source="x") == arch_sidecar(weights)
    assert arch_sidecar(weights).name == "backbone.pth.json"
    assert read_arch_sidecar(weights) == {
        "arch": "resnet18",
        "small_images": True,
        "source": "x",
        "written_by": "objcrop",
    }


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_unreadable_sidecar_is_an_error_naming_it(tmp_path, text):
    weights = tmp_path / "backbone.pth"
    arch_sidecar(weights).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"backbone\.pth\.json"):
        read_arch_sidecar(weights)


def test_checkpoint_arch_reads_the_methods_declared_attributes(tmp_path):
    state = {"config": json.dumps(config_of({"name": "byol", "backbone": "resnet18", "small_images": True}))}
    assert checkpoint_arch(state, tmp_path / "c.pt") == ("resnet18", True)
    default = {"config": json.dumps(config_of({"name": "densecl"}))}
    assert checkpoint_arch(default, tmp_path / "c.pt") == ("resnet50", False)  # the constructor's default


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("not json", "no readable 'method' section"),
        (json.dumps({"data": {}}), "no readable 'method' section"),
        (json.dumps(config_of({"name": "moco", "no_such_argument": 1})), "does not build"),
        (json.dumps(config_of({"name": "simclr"})), "does not build"),
    ],
)
def test_checkpoint_arch_names_the_file_of_a_bad_config(tmp_path, config, message):
    with pytest.raises(ValueError, match=rf"c\.pt: .*{message}"):
        checkpoint_arch({"config": config}, tmp_path / "c.pt")


def test_checkpoint_backbone_gives_the_query_trunk_and_its_architecture(tmp_path):
    config = config_of({"name": "moco", "backbone": "resnet18", "dim": 8, "queue_size": 16, "small_images": True})
    torch.manual_seed(0)
    method = build_method(config)
    path = tmp_path / "ckpt-00000001.pt"
    atomic_torch_save({"model": method.state_dict(), "step": 1, "config": json.dumps(config)}, path)
    weights, arch = checkpoint_backbone(path)
    assert arch == ("resnet18", True)
    expected = trunk_weights(method.backbone)
    assert weights.keys() == expected.keys() and not any(k.startswith("fc.") for k in weights)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert all(v.device.type == "cpu" for v in weights.values())


def test_checkpoint_backbone_of_a_foreign_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "foreign.pt"
    atomic_torch_save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        checkpoint_backbone(path)
