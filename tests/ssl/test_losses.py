"""Loss functions of objcrop.ssl.losses against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from objcrop.ssl.losses import (
    byol_loss,
    contrastive_accuracy,
    contrastive_logits,
    dense_correspondence,
    densecl_dense_loss,
    densecl_loss,
    info_nce,
)

torch.set_num_threads(1)


def _unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _reference_info_nce(q, k, queue, temperature) -> float:
    """Row-by-row -log(exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.n_j/t))), in float64."""
    q, k, queue = q.double(), k.double(), queue.double()
    total = 0.0
    for i in range(q.shape[0]):
        positive = math.exp(float(q[i] @ k[i]) / temperature)
        negatives = sum(math.exp(float(q[i] @ n) / temperature) for n in queue)
        total += -math.log(positive / (positive + negatives))
    return total / q.shape[0]


def test_info_nce_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    q, k, queue = _unit(6, 16, generator=g), _unit(6, 16, generator=g), _unit(20, 16, generator=g)
    for temperature in (0.07, 0.2, 1.0):
        assert info_nce(q, k, queue, temperature).item() == pytest.approx(
            _reference_info_nce(q, k, queue, temperature), rel=1e-5
        )


def test_info_nce_of_random_embeddings_is_log_k_plus_one():
    g = torch.Generator().manual_seed(1)
    queue_size = 64
    q, k, queue = _unit(256, 4096, generator=g), _unit(256, 4096, generator=g), _unit(queue_size, 4096, generator=g)
    assert info_nce(q, k, queue, 0.2).item() == pytest.approx(math.log(queue_size + 1), abs=0.05)


def test_contrastive_logits_layout_and_accuracy():
    g = torch.Generator().manual_seed(2)
    q, queue = _unit(5, 8, generator=g), _unit(7, 8, generator=g)
    logits = contrastive_logits(q, q, queue)
    assert logits.shape == (5, 8) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, 0], torch.ones(5))
    torch.testing.assert_close(logits[:, 1:], q @ queue.t())
    assert contrastive_accuracy(logits).item() == 1.0
    assert contrastive_accuracy(contrastive_logits(q, -q, queue)).item() == 0.0


def test_info_nce_gradient_reaches_queries_only_through_inputs():
    g = torch.Generator().manual_seed(3)
    q = _unit(4, 8, generator=g).requires_grad_(True)
    k, queue = _unit(4, 8, generator=g), _unit(10, 8, generator=g)
    info_nce(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_byol_loss_endpoints():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(8, 32, generator=g)
    assert byol_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, 3.0 * p).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    assert byol_loss(a, b).item() == pytest.approx(2.0, abs=1e-6)  # orthogonal


def test_dense_loss_is_info_nce_over_matched_locations():
    g = torch.Generator().manual_seed(5)
    n, c, d, h, w = 2, 8, 6, 2, 3
    q_grid = F.normalize(torch.randn(n, c, h, w, generator=g), dim=1)
    k_grid = F.normalize(torch.randn(n, c, h, w, generator=g), dim=1)
    q_feat, k_feat = torch.randn(n, d, h, w, generator=g), torch.randn(n, d, h, w, generator=g)
    queue = _unit(12, c, generator=g)
    match = dense_correspondence(q_feat, k_feat)
    q_rows, k_rows = [], []
    for i in range(n):
        for s in range(h * w):
            q_rows.append(q_grid[i].flatten(1)[:, s])
            k_rows.append(k_grid[i].flatten(1)[:, match[i, s]])
    expected = _reference_info_nce(torch.stack(q_rows), torch.stack(k_rows), queue, 0.2)
    assert densecl_dense_loss(q_grid, k_grid, q_feat, k_feat, queue, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_densecl_loss_weights():
    g, d = torch.tensor(2.0), torch.tensor(6.0)
    assert densecl_loss(g, d, 0.0).item() == 2.0
    assert densecl_loss(g, d, 1.0).item() == 6.0
    assert densecl_loss(g, d, 0.5).item() == 4.0
    assert densecl_loss(g, d, 0.25).item() == pytest.approx(3.0)
