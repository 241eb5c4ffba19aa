"""LARS trust ratio and exclusions, and the warmup + cosine learning-rate schedule."""

import math

import pytest
import torch
import torch.nn as nn

from objcrop.ssl.lars import LARS
from objcrop.ssl.schedules import scaled_lr, warmup_cosine, warmup_cosine_lambda

torch.set_num_threads(1)


def _set_grads(weight: torch.Tensor, bias: torch.Tensor) -> None:
    weight.grad = torch.full_like(weight, 0.5)
    bias.grad = torch.full_like(bias, 2.0)


def test_trust_ratio_scales_weights_and_skips_biases():
    layer = nn.Linear(4, 3)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = LARS(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001)
    _set_grads(layer.weight, layer.bias)
    opt.step()

    update = torch.full_like(weight, 0.5) + 0.01 * weight
    trust = 0.001 * weight.norm() / update.norm()
    torch.testing.assert_close(layer.weight.detach(), weight - 0.1 * trust * update)
    torch.testing.assert_close(layer.bias.detach(), bias - 0.1 * 2.0)  # no decay, no trust ratio

    # Second step: momentum buffer = 0.9 * previous update + new update.
    weight2, bias2 = layer.weight.detach().clone(), layer.bias.detach().clone()
    _set_grads(layer.weight, layer.bias)
    opt.step()
    update2 = torch.full_like(weight2, 0.5) + 0.01 * weight2
    trust2 = 0.001 * weight2.norm() / update2.norm()
    torch.testing.assert_close(layer.weight.detach(), weight2 - 0.1 * (0.9 * trust * update + trust2 * update2))
    torch.testing.assert_close(layer.bias.detach(), bias2 - 0.1 * (0.9 * 2.0 + 2.0))


def test_batchnorm_parameters_are_excluded_and_groups_can_opt_in():
    bn = nn.BatchNorm1d(3)
    bn.weight.grad, bn.bias.grad = torch.full((3,), 1.0), torch.full((3,), 1.0)
    LARS(bn.parameters(), lr=0.5, weight_decay=0.1).step()
    torch.testing.assert_close(bn.weight.detach(), torch.full((3,), 0.5))  # plain SGD: 1 - 0.5 * 1
    torch.testing.assert_close(bn.bias.detach(), torch.full((3,), -0.5))

    bias = nn.Parameter(torch.full((3,), 2.0))
    bias.grad = torch.ones(3)
    LARS([{"params": [bias], "exclude_1d": False}], lr=1.0, trust_coefficient=0.01).step()
    trust = 0.01 * torch.full((3,), 2.0).norm() / torch.ones(3).norm()
    torch.testing.assert_close(bias.detach(), torch.full((3,), 2.0) - trust)


def test_zero_weights_get_a_trust_ratio_of_one():
    weight = nn.Parameter(torch.zeros(2, 2))
    weight.grad = torch.ones(2, 2)
    LARS([weight], lr=0.1).step()
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), -0.1))


def test_lars_minimises_a_regression():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    model = nn.Linear(8, 1, bias=False)  # the trust ratio acts on the weight matrix only
    opt = LARS(model.parameters(), lr=10.0)
    losses = []
    for _ in range(50):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0], losses


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="invalid LARS"):
        LARS(nn.Linear(2, 2).parameters(), lr=-1.0)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, warmup_steps=10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, warmup_steps=10, final_factor=0.01) == pytest.approx(0.01)
    assert warmup_cosine(40, 100) == pytest.approx((math.cos(math.pi * 0.4) + 1) / 2)
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)

    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_lambda(20, warmup_steps=4))
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4] == pytest.approx(2.0) and lrs[-1] < 0.05
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lambda(10, warmup_steps=20)
