"""A MoCo-v2 training step written straight from the paper's pseudocode (He et al., 2020, Algorithm 1).

It is deliberately plain (one process, float32, a FIFO queue, a Python loop for the momentum update)
so that :class:`~objcrop.ssl.moco.MoCoV2` can be checked against it: from the same weights and
queue, both must give the same loss, the same key-encoder weights and the same set of queued keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["reference_moco_v2_step"]


def reference_moco_v2_step(
    f_q: nn.Module,
    f_k: nn.Module,
    queue: torch.Tensor,
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    momentum: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoCo-v2 step: loss, SGD update of ``f_q``, momentum update of ``f_k``, queue update.

    As in the official code (not spelled out in the pseudocode), queries and keys are
    L2-normalised.

    Args:
        f_q: Query encoder, images -> ``[N, C]``; updated by ``optimizer``.
        f_k: Key encoder with the same parameter list as ``f_q``; updated in place.
        queue: ``[K, C]`` normalised keys, oldest first.
        x_q: ``[N, 3, H, W]`` query views.
        x_k: ``[N, 3, H, W]`` key views.
        optimizer: Optimizer over ``f_q``'s parameters.
        momentum: ``m``.
        temperature: ``t``.

    Returns:
        The loss (detached, float32) and the new queue (the ``N`` oldest keys dropped, the new
        keys appended).
    """
    q = F.normalize(f_q(x_q), dim=1).float()  # queries: NxC
    with torch.no_grad():
        k = F.normalize(f_k(x_k), dim=1).float()  # keys: NxC, no gradient
    n, c = q.shape
    l_pos = torch.bmm(q.view(n, 1, c), k.view(n, c, 1)).view(n, 1)  # positive logits: Nx1
    l_neg = torch.mm(q, queue.t().float())  # negative logits: NxK
    logits = torch.cat([l_pos, l_neg], dim=1)  # Nx(1+K)
    labels = torch.zeros(n, dtype=torch.long, device=q.device)  # positives are the 0-th
    loss = nn.CrossEntropyLoss()(logits / temperature, labels)

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        for p_k, p_q in zip(f_k.parameters(), f_q.parameters(), strict=True):
            p_k.copy_(momentum * p_k + (1 - momentum) * p_q)
        # enqueue the newest keys, dequeue the oldest
        new_queue = torch.cat([queue, k.to(queue.dtype)])[-queue.shape[0] :]
    return loss.detach(), new_queue
