"""BYOL mechanics: tau schedule, target EMA, routed projectors, training reduces the loss."""

import math

import pytest
import torch

from objcrop.crops.policies import KIND_CODES
from objcrop.ssl.byol import BYOL
from objcrop.ssl.schedules import byol_tau
from tests.conftest import with_a_third_view

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


def _rotation(angle: float) -> torch.Tensor:
    return torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def _at(angles: list[float], radius: float = 1.0) -> torch.Tensor:
    """Rows ``radius * (cos a, sin a)``."""
    return radius * torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


class _Rotate(torch.nn.Module):
    """A stand-in online/target network on 2-d "views": each view rotated by a fixed angle."""

    def __init__(self, angle: float) -> None:
        super().__init__()
        self.register_buffer("matrix", _rotation(angle))

    def forward(self, views, kinds):
        return [v @ self.matrix.t() for v in views]


def test_loss_is_2_minus_2_cos_by_hand_for_known_vectors_paired_across_views():
    """Stand-in networks make every vector known: online = identity, predictor = rotation by alpha, target =
    rotation by beta, views at angles a1, a2 (norms differ: the cosine ignores them). Prediction of view 1
    against target of view 2 and vice versa, averaged over the batch:
    (2 - 2 cos(a1 + alpha - a2 - beta)) + (2 - 2 cos(a2 + alpha - a1 - beta))."""
    alpha, beta = 0.7, -0.4
    a1, a2 = [0.3, 2.0, -1.0], [1.9, 2.5, 0.6]
    model = _tiny_byol(proj_dim=2)
    model.online, model.target = _Rotate(0.0), _Rotate(beta)
    model.predictor = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.predictor.weight.copy_(_rotation(alpha))
    v1, v2 = _at(a1, radius=2.0), _at(a2, radius=0.5)
    out = model({"views": [v1, v2], "kinds": torch.full((3, 2), SCENE)})

    def by_hand(first: list[float], second: list[float], rotate_p: float, rotate_t: float) -> float:
        terms = [2 - 2 * math.cos(x + rotate_p - y - rotate_t) for x, y in zip(first, second, strict=True)]
        return sum(terms) / len(terms)

    expected = by_hand(a1, a2, alpha, beta) + by_hand(a2, a1, alpha, beta)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)
    assert out["cos_sim"].item() == pytest.approx(1 - expected / 4, abs=1e-5)
    swapped = model({"views": [v2, v1], "kinds": torch.full((3, 2), SCENE)})
    assert swapped["loss"].item() == pytest.approx(expected, abs=1e-5)  # symmetric in the views
    # What a wrong loss would give here, each well apart from the right one.
    for wrong in (
        by_hand(a1, a1, alpha, beta) + by_hand(a2, a2, alpha, beta),  # prediction against its own view's target
        by_hand(a1, a2, alpha, 0.0) + by_hand(a2, a1, alpha, 0.0),  # the online network as target
        by_hand(a1, a2, 0.0, beta) + by_hand(a2, a1, 0.0, beta),  # no predictor
        by_hand(a1, a2, alpha, beta + alpha) + by_hand(a2, a1, alpha, beta + alpha),  # predictor on the target too
        by_hand(a1, a2, alpha, beta),  # one direction only
    ):
        assert abs(wrong - expected) > 0.1


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cosine, written out: (a / |a|) . (b / |b|)."""
    return ((a / a.norm(dim=1, keepdim=True)) * (b / b.norm(dim=1, keepdim=True))).sum(dim=1).mean()


def test_real_networks_loss_uses_the_online_predictions_and_the_ema_targets_projections():
    """With the real networks: the loss is 2 - 2 cos of predictor(online(view)) and target(other view), summed
    over both directions, with the target the EMA network (not the online one), computed here by hand."""
    torch.manual_seed(0)
    model = _tiny_byol(base_tau=0.5)
    batch = _batch()
    # A few steps: predictions and targets become correlated, and the EMA target is neither the initial
    # copy nor the online network.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for step in range(3):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
        model.after_optimizer_step(step, 10)
    model.eval()  # BatchNorm on running statistics: each sample's outputs depend on it alone
    out = model(batch)
    (v1, v2), kinds = batch["views"], batch["kinds"]
    with torch.no_grad():
        z1, z2 = (model.online([v], kinds[:, [i]])[0] for i, v in enumerate((v1, v2)))
        p1, p2 = model.predictor(z1), model.predictor(z2)
        t1, t2 = (model.target([v], kinds[:, [i]])[0] for i, v in enumerate((v1, v2)))
    cos = (_mean_cos(p1, t2) + _mean_cos(p2, t1)) / 2
    torch.testing.assert_close(out["loss"].detach(), 4 - 4 * cos)  # (2 - 2 cos_12) + (2 - 2 cos_21)
    torch.testing.assert_close(out["cos_sim"], cos)
    # The same formula with the online network as target, without the predictor, or with the predictor on
    # the target branch too, differs.
    for other in (
        (_mean_cos(p1, z2) + _mean_cos(p2, z1)) / 2,
        (_mean_cos(z1, t2) + _mean_cos(z2, t1)) / 2,
        (_mean_cos(p1, model.predictor(t2)) + _mean_cos(p2, model.predictor(t1))) / 2,
    ):
        assert abs(other.item() - cos.item()) > 0.02, (other, cos)


def test_gradients_reach_online_and_predictor_only():
    model = _tiny_byol()
    out = model(_batch())
    assert set(out) == {"loss", "cos_sim"}
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


def test_defaults_are_byols():
    """Built with no arguments (a ResNet-50, about 2 s): the settings of the BYOL paper."""
    model = BYOL()
    assert (model.arch, model.small_images, model.base_tau) == ("resnet50", False, 0.996)
    projector = model.online.head.heads[0]
    assert (projector.fc1.in_features, projector.fc1.out_features, projector.fc2.out_features) == (2048, 4096, 256)
    assert (model.predictor.fc1.in_features, model.predictor.fc1.out_features) == (256, 4096)
    assert model.predictor.fc2.out_features == 256 and len(model.online.head.heads) == 1
    assert model.has_unused_parameters is False
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_constructor_options_reach_the_networks():
    plain = _tiny_byol()
    assert plain.online.head.heads[0].fc1.in_features == 512  # resnet18's features, as asked
    assert plain.online.backbone.conv1.kernel_size == (7, 7)
    assert len(plain.online.head.heads) == 1 and plain.has_unused_parameters is False
    small = _tiny_byol(small_images=True, separate_heads=True)
    assert small.online.backbone.conv1.kernel_size == (3, 3) and small.target.backbone.conv1.stride == (1, 1)
    assert len(small.online.head.heads) == 2 and len(small.target.head.heads) == 2
    assert small.has_unused_parameters is True
    synced = _tiny_byol(sync_bn=True)
    for network in (synced.online, synced.predictor, synced.target):
        norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())
    with pytest.raises(ValueError) as err:
        plain(with_a_third_view(_batch(0)))
    assert str(err.value) == "BYOL takes two views, got 3"
