"""Projection heads, routing of views to heads by view kind, and the view encoder.

The object-aware cropping paper trains *separate projection heads* for object views and for
context views (dilated, shifted or scene crops): +1.1 mAP over one shared head. The two views of a
sample arrive in random order, so a view is routed by its kind code
(:data:`objcrop.crops.policies.KIND_CODES`), never by its position.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from objcrop.crops.policies import KIND_CODES, VIEW_KINDS

__all__ = [
    "DEFAULT_KIND_TO_HEAD",
    "ConvMLPHead",
    "KindRoutedHead",
    "MLPHead",
    "ViewEncoder",
    "views_and_kinds",
]

# Object crops get head 0; every context crop (dilated, shifted, scene) gets head 1.
DEFAULT_KIND_TO_HEAD: dict[str, int] = {"object": 0, "dilated": 1, "shifted": 1, "scene": 1}


class MLPHead(nn.Sequential):
    """Two-layer MLP: Linear -> [BatchNorm1d] -> ReLU -> Linear.

    ``MLPHead(2048, 2048, 128)`` is the MoCo-v2 projector; ``MLPHead(2048, 4096, 256, batch_norm=True)``
    is BYOL's projector, and ``MLPHead(256, 4096, 256, batch_norm=True)`` its predictor.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(fc1=nn.Linear(in_dim, hidden_dim))
        if batch_norm:
            layers["bn1"] = nn.BatchNorm1d(hidden_dim)
        layers["relu"] = nn.ReLU(inplace=True)
        layers["fc2"] = nn.Linear(hidden_dim, out_dim)
        super().__init__(layers)


class ConvMLPHead(nn.Sequential):
    """Two-layer MLP of 1x1 convolutions over a feature map: DenseCL's dense projector.

    Maps ``[B, in_dim, h, w]`` to ``[B, out_dim, h, w]``, applying the same MLP at every location.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_dim, hidden_dim, kernel_size=1),
                relu=nn.ReLU(inplace=True),
                conv2=nn.Conv2d(hidden_dim, out_dim, kernel_size=1),
            )
        )


class KindRoutedHead(nn.Module):
    """A set of heads; each sample goes through the head of its view kind.

    Two vectorised routings, with the same outputs and gradients:

    * ``evaluate_all``: every head runs on the whole batch and each sample keeps its own head's
      output (``torch.where``). No host synchronisation and every head takes part in every step
      (no unused parameters under DDP); valid only for heads without batch statistics.
    * otherwise the batch is split with ``index_select`` into one sub-batch per head and the
      outputs are put back with ``index_copy``, so a head's BatchNorm sees only its own samples.
      The split size is read on the host (one sync per head). Under DDP a head that gets no sample
      in a step gets no gradient: use ``find_unused_parameters=True``. A head with BatchNorm needs
      at least two samples of its kinds per step in training mode.

    Either way a head's gradient comes only from the samples routed to it.

    Args:
        make_head: Builds one head (called once per head, so heads do not share weights).
        separate: False puts every kind through a single head.
        kinds_to_head: View kind -> head index, covering every kind in :data:`VIEW_KINDS`;
            defaults to :data:`DEFAULT_KIND_TO_HEAD` (object -> 0, context -> 1).
        evaluate_all: Routing choice; by default true exactly when the heads hold no BatchNorm.
        identical_init: Start every head from the first head's weights. Two independently initialised
            heads map the same feature to unrelated directions, so at the start the positive (the other
            kind's head) looks less similar than negatives of the query's own head; starting equal makes
            separate heads begin as one shared head and diverge only as far as training pulls them.
    """

    def __init__(
        self,
        make_head: Callable[[], nn.Module],
        separate: bool = True,
        kinds_to_head: Mapping[str, int] | None = None,
        evaluate_all: bool | None = None,
        identical_init: bool = True,
    ) -> None:
        super().__init__()
        table = dict(DEFAULT_KIND_TO_HEAD if kinds_to_head is None else kinds_to_head)
        if set(table) != set(VIEW_KINDS):
            raise ValueError(f"kinds_to_head must map exactly the kinds {VIEW_KINDS}, got {sorted(table)}")
        if not separate:
            table = dict.fromkeys(VIEW_KINDS, 0)
        num_heads = max(table.values()) + 1
        if sorted(set(table.values())) != list(range(num_heads)):
            raise ValueError(f"head indices must be 0..n-1 without gaps, got {table}")
        self.heads = nn.ModuleList(make_head() for _ in range(num_heads))
        if identical_init:
            for head in self.heads[1:]:
                head.load_state_dict(self.heads[0].state_dict())
        has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.heads.modules())
        self.evaluate_all = not has_batch_norm if evaluate_all is None else evaluate_all
        route = torch.tensor([table[kind] for kind in VIEW_KINDS], dtype=torch.long)
        self.register_buffer("route", route, persistent=False)

    def head_index(self, kinds: torch.Tensor) -> torch.Tensor:
        """Head index of each kind code (same shape as ``kinds``)."""
        return self.route[kinds]

    def forward(self, x: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """Applies each sample's head.

        Args:
            x: ``[N, ...]`` features.
            kinds: ``[N]`` kind codes.

        Returns:
            ``[N, ...]`` head outputs, in the order of ``x``.
        """
        if len(self.heads) == 1:
            return self.heads[0](x)
        if kinds.shape != x.shape[:1]:
            raise ValueError(f"kinds must have shape [{x.shape[0]}], got {list(kinds.shape)}")
        head_of = self.head_index(kinds)
        if self.evaluate_all:
            return self._select(x, head_of)
        return self._split(x, head_of)

    def _select(self, x: torch.Tensor, head_of: torch.Tensor) -> torch.Tensor:
        out = self.heads[0](x)
        for h in range(1, len(self.heads)):
            y = self.heads[h](x)
            mask = (head_of == h).view(-1, *([1] * (y.dim() - 1)))
            out = torch.where(mask, y, out)
        return out

    def _split(self, x: torch.Tensor, head_of: torch.Tensor) -> torch.Tensor:
        out = None
        for h, head in enumerate(self.heads):
            idx = (head_of == h).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            y = head(x.index_select(0, idx))
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return self.heads[0](x) if out is None else out


class ViewEncoder(nn.Module):
    """Backbone followed by a kind-routed head, applied to the views of a batch.

    Each view goes through the backbone on its own (BatchNorm statistics per view, as in MoCo and
    BYOL); the head then runs once over all views together, so with an object/context policy each
    head sees every sample once.
    """

    def __init__(self, backbone: nn.Module, head: KindRoutedHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[torch.Tensor], kinds: torch.Tensor) -> list[torch.Tensor]:
        """Encodes ``V`` views.

        Args:
            views: ``V`` tensors ``[B, 3, H, W]`` (sizes may differ between views).
            kinds: ``[B, V]`` kind codes; column ``v`` belongs to ``views[v]``.

        Returns:
            ``V`` head outputs ``[B, ...]``.
        """
        features = torch.cat([self.backbone(v) for v in views])
        out = self.head(features, kinds.t().reshape(-1))
        return list(out.split(views[0].shape[0]))


def views_and_kinds(batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reads a two-view batch: ``{"views": [x1, x2], "kinds": [B, 2]}`` or ``(x1, x2[, kinds])``.

    Missing kinds mean scene crops (plain two-view SSL).

    Raises:
        ValueError: If the views differ in batch size or the kinds have the wrong shape.
    """
    if isinstance(batch, Mapping):
        views, kinds = list(batch["views"]), batch.get("kinds")
    else:
        views, kinds = list(batch[:2]), batch[2] if len(batch) > 2 else None
    size = views[0].shape[0]
    if any(v.shape[0] != size for v in views):
        raise ValueError(f"views have different batch sizes: {[v.shape[0] for v in views]}")
    if kinds is None:
        kinds = torch.full((size, len(views)), KIND_CODES["scene"], dtype=torch.long, device=views[0].device)
    if kinds.shape != (size, len(views)):
        raise ValueError(f"kinds must have shape [{size}, {len(views)}], got {list(kinds.shape)}")
    return views, kinds.to(device=views[0].device, dtype=torch.long)
