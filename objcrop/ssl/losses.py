"""Loss functions of the SSL methods, as plain functions of tensors.

Embeddings entering :func:`info_nce` and :func:`densecl_dense_loss` must be L2-normalised along
the channel dimension (the methods normalise them, and queues store normalised keys). Logits are
computed in float32 whatever the input precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "byol_loss",
    "contrastive_accuracy",
    "contrastive_logits",
    "dense_correspondence",
    "densecl_dense_loss",
    "densecl_loss",
    "info_nce",
    "info_nce_from_logits",
]


def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """MoCo logits: column 0 is the positive ``q . k``, the rest the negatives ``q . queue``.

    Args:
        q: ``[N, C]`` normalised queries.
        k: ``[N, C]`` normalised keys, the positive of each query.
        queue: ``[K, C]`` normalised negatives.

    Returns:
        ``[N, 1 + K]`` float32 cosine similarities (not divided by the temperature).
    """
    q, k, queue = q.float(), k.float(), queue.float()
    positives = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.t()
    return torch.cat([positives, negatives], dim=1)


def info_nce_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of ``logits / temperature`` with the positive at index 0 (mean over rows)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits / temperature, labels)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE loss (Eq. 1 of He et al., 2020).

    With random embeddings it starts near ``ln(K + 1)``.

    Args:
        q: ``[N, C]`` normalised queries.
        k: ``[N, C]`` normalised positive keys (detached by the caller).
        queue: ``[K, C]`` normalised negative keys.
        temperature: Softmax temperature (0.2 in MoCo-v2).
    """
    return info_nce_from_logits(contrastive_logits(q, k, queue), temperature)


@torch.no_grad()
def contrastive_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose positive (column 0) has the largest logit."""
    return (logits.argmax(dim=1) == 0).float().mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss ``2 - 2 cos(p, z)``, averaged over the batch.

    It is 0 when ``p`` and ``z`` point the same way and 4 when they are opposite.

    Args:
        p: ``[N, C]`` online predictions.
        z: ``[N, C]`` target projections (detached by the caller).
    """
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


def _flatten_map(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` or ``[N, C, S]`` -> ``[N, C, S]``."""
    return x.flatten(2) if x.dim() == 4 else x


@torch.no_grad()
def dense_correspondence(q_features: torch.Tensor, k_features: torch.Tensor) -> torch.Tensor:
    """Matches every query location to the key location with the most similar backbone feature.

    Args:
        q_features: ``[N, D, h, w]`` (or ``[N, D, S]``) backbone features of the query view.
        k_features: ``[N, D, h', w']`` (or ``[N, D, S']``) backbone features of the key view.

    Returns:
        ``[N, S]`` long index into the ``S'`` key locations (row-major), by cosine similarity.
    """
    q = F.normalize(_flatten_map(q_features).float(), dim=1)
    k = F.normalize(_flatten_map(k_features).float(), dim=1)
    similarity = q.transpose(1, 2) @ k  # [N, S, S']
    return similarity.argmax(dim=2)


def densecl_dense_loss(
    q_grid: torch.Tensor,
    k_grid: torch.Tensor,
    q_features: torch.Tensor,
    k_features: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """DenseCL's dense contrastive loss (Wang et al., 2021, Eq. 2).

    Each query location is a separate InfoNCE term: its positive is the key-grid vector at the
    location matched by :func:`dense_correspondence`, its negatives are the dense queue.

    Args:
        q_grid: ``[N, C, h, w]`` (or ``[N, C, S]``) normalised dense projections of the query view.
        k_grid: ``[N, C, h', w']`` (or ``[N, C, S']``) normalised dense projections of the key view.
        q_features: Backbone features of the query view, used only for matching.
        k_features: Backbone features of the key view, used only for matching.
        queue: ``[K, C]`` normalised dense negatives.
        temperature: Softmax temperature.

    Returns:
        The loss averaged over all ``N * S`` query locations.
    """
    q_grid, k_grid = _flatten_map(q_grid), _flatten_map(k_grid)
    match = dense_correspondence(q_features, k_features)  # [N, S]
    positives = torch.gather(k_grid, 2, match.unsqueeze(1).expand(-1, k_grid.shape[1], -1))  # [N, C, S]
    q_rows = q_grid.transpose(1, 2).reshape(-1, q_grid.shape[1])
    k_rows = positives.transpose(1, 2).reshape(-1, positives.shape[1])
    return info_nce(q_rows, k_rows, queue, temperature)


def densecl_loss(global_loss: torch.Tensor, dense_loss: torch.Tensor, lambda_: float) -> torch.Tensor:
    """DenseCL's total loss ``(1 - lambda) * global + lambda * dense`` (lambda = 0.5 in the paper)."""
    return (1 - lambda_) * global_loss + lambda_ * dense_loss
