"""BYOL mechanics: tau schedule, target EMA, routed projectors, training reduces the loss."""

import math

import pytest
import torch

from objcrop.crops.policies import KIND_CODES
from objcrop.ssl.byol import BYOL
from objcrop.ssl.schedules import byol_tau

torch.set_num_threads(1)

OBJ, SCENE = KIND_CODES["object"], KIND_CODES["scene"]
BATCH = 8


def _tiny_byol(**kwargs) -> BYOL:
    settings = {"proj_hidden_dim": 64, "proj_dim": 16, "pred_hidden_dim": 64}
    return BYOL("resnet18", **(settings | kwargs))


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    views = [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)]
    kinds = torch.tensor([[OBJ, SCENE], [SCENE, OBJ]]).repeat(BATCH // 2, 1)
    return {"views": views, "kinds": kinds}


def test_tau_schedule_endpoints_and_shape():
    assert byol_tau(0, 1000) == pytest.approx(0.996)
    assert byol_tau(1000, 1000) == pytest.approx(1.0)
    assert byol_tau(500, 1000) == pytest.approx(0.998)
    assert byol_tau(250, 1000) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    taus = [byol_tau(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:], strict=False))
    assert byol_tau(2000, 1000) == pytest.approx(1.0)  # held after the end


def test_update_target_is_an_ema_with_the_scheduled_tau():
    model = _tiny_byol(base_tau=0.9)
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
    old_target = [p.clone() for p in model.target.parameters()]
    online = [p.clone() for p in model.online.parameters()]
    tau = model.update_target(step=25, total_steps=100)
    assert tau == pytest.approx(byol_tau(25, 100, 0.9))
    for new, old, o in zip(model.target.parameters(), old_target, online, strict=True):
        torch.testing.assert_close(new, tau * old + (1 - tau) * o, rtol=0, atol=1e-6)
    frozen = [p.clone() for p in model.target.parameters()]
    assert model.after_optimizer_step(100, 100) == {"tau": pytest.approx(1.0)}
    for new, old in zip(model.target.parameters(), frozen, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0)  # tau = 1 freezes the target


def test_gradients_reach_online_and_predictor_only():
    model = _tiny_byol()
    out = model(_batch())
    assert set(out) == {"loss", "cos_sim"}
    assert 0.0 <= out["loss"].item() <= 8.0
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is not None for p in model.online.parameters())


def test_separate_projectors_route_by_kind_and_ignore_view_order():
    torch.manual_seed(0)
    model = _tiny_byol(separate_heads=True)
    assert len(model.online.head.heads) == 2 and len(model.target.head.heads) == 2
    batch = _batch()
    model.eval()
    loss = model(batch)["loss"]
    swapped = {"views": batch["views"][::-1], "kinds": batch["kinds"].flip(1)}
    torch.testing.assert_close(model(swapped)["loss"], loss)

    model.train()
    all_scene = {"views": batch["views"], "kinds": torch.full((BATCH, 2), SCENE)}
    model(all_scene)["loss"].backward()
    object_head, context_head = model.online.head.heads
    assert all(p.grad is None for p in object_head.parameters())
    assert all(p.grad is not None for p in context_head.parameters())


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = _tiny_byol()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    batch = _batch()
    losses = []
    for step in range(4):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step(step, 4)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
