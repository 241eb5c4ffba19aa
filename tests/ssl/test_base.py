"""The method contract (objcrop.ssl.base.SSLMethod), checked for every method the config can name."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from objcrop import registry
from objcrop.ssl.backbone_io import method_arch
from objcrop.ssl.base import SSLMethod, build_method
from objcrop.ssl.config import DEFAULTS
from tests.conftest import TINY_METHODS, tiny_batch, tiny_method_config

METHODS = registry.METHODS.names()


def test_every_registered_method_has_tiny_settings():
    assert set(METHODS) == set(TINY_METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_method_runs_forward_backward_and_after_optimizer_step(name):
    torch.manual_seed(0)
    method = build_method(tiny_method_config(name)).train()
    assert isinstance(method, SSLMethod)
    out = method(tiny_batch())
    assert isinstance(out, dict) and "loss" in out
    loss = out["loss"]
    assert loss.ndim == 0 and loss.requires_grad and math.isfinite(loss.item())
    assert all(not v.requires_grad for k, v in out.items() if k != "loss" and torch.is_tensor(v))
    trainable = [p for p in method.parameters() if p.requires_grad]
    frozen = {id(p) for p in method.parameters() if not p.requires_grad}
    before = {k: v.clone() for k, v in method.state_dict().items() if v.is_floating_point()}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    torch.optim.SGD(trainable, lr=0.1).step()
    extra = method.after_optimizer_step(0, 10)
    assert isinstance(extra, dict) and all(isinstance(v, float) and math.isfinite(v) for v in extra.values())
    assert frozen, "a momentum / target encoder is frozen: the optimizer must not get it"
    changed = [k for k, v in method.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed  # the step (and the EMA) moved weights


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("separate_heads", [False, True])
def test_method_declares_the_contract_attributes(name, separate_heads):
    config = tiny_method_config(name, separate_heads=separate_heads)
    with torch.device("meta"):
        method = build_method(config)
    assert method.arch == "resnet18" and method.small_images is True
    # Separate heads leave one head without a gradient when a batch holds no view of its kind.
    assert method.has_unused_parameters is separate_heads
    assert isinstance(method.backbone, nn.Module)
    assert method_arch(config) == ("resnet18", True)


@pytest.mark.parametrize("name", METHODS)
def test_the_declared_architecture_is_the_constructors_default_when_the_config_names_none(name):
    config = copy.deepcopy(DEFAULTS)
    config["method"] = {"name": name}
    assert method_arch(config) == ("resnet50", False)


def test_a_method_without_the_contract_cannot_be_built():
    class Incomplete(SSLMethod):
        def forward(self, batch):
            return {"loss": torch.zeros(())}

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
