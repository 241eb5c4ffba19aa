"""Pictures of what a policy crops, in the style of the paper's figures 8-13.

One figure per image: a header with the image, its top-k proposals and (optionally) its ground
truth, then one row per policy with sampled view pairs. Each pair shows both crop boxes (solid)
and the regions they were sampled in (dashed) on the image, and below them the two views as the
network would see them before colour augmentation (the crop box resized to a square).

Figures are plain :class:`matplotlib.figure.Figure` objects on the Agg canvas: no pyplot state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from objcrop.analysis.png import PNG_METADATA, check_png_out
from objcrop.crops.policies import ViewPair, ViewPairPolicy
from objcrop.io import atomic_open

__all__ = ["VIEW_COLORS", "crop_view", "figure_size", "draw_view_pairs", "draw_records", "save_figure"]

VIEW_COLORS = ("#ff7f0e", "#17becf")  # view 1 orange, view 2 cyan
PROPOSAL_COLOR = "#ffd92f"
GT_COLOR = "#2ca02c"
FALLBACK_COLOR = "#d62728"
log = logging.getLogger(__name__)

_DISPLAY_MAX_SIDE = 640  # images are shown downscaled to this; boxes stay in original pixels


def crop_view(image: Image.Image, crop: np.ndarray, size: int = 112) -> Image.Image:
    """Cuts the xyxy ``crop`` out of ``image`` and resizes it to ``size x size`` (geometry only)."""
    box = tuple(float(v) for v in crop)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def _display_copy(image: Image.Image) -> np.ndarray:
    scale = _DISPLAY_MAX_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


def _show_image(ax, pixels: np.ndarray, width: int, height: int) -> None:
    ax.imshow(pixels, extent=(0, width, height, 0), interpolation="bilinear")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _box(
    ax, box, color: str, lw: float = 2.0, ls: str = "-", label: str | None = None, corner: str = "top-left"
) -> None:
    """Draws an xyxy box; ``label`` goes inside its ``top-left`` or ``bottom-right`` corner."""
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=lw, ls=ls))
    if label:
        top_left = corner == "top-left"
        ax.text(
            x1 + 2 if top_left else x2 - 2,
            y1 + 2 if top_left else y2 - 2,
            label,
            color="black",
            fontsize=7,
            va="top" if top_left else "bottom",
            ha="left" if top_left else "right",
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0, "alpha": 0.85},
            clip_on=True,
        )


def _draw_pair(sub: SubFigure, image: Image.Image, pixels: np.ndarray, pair: ViewPair, view_size: int) -> None:
    width, height = image.size
    axes = sub.subplot_mosaic(
        [["scene", "scene"], ["v1", "v2"]],
        height_ratios=[2.0 * height / width, 1.0],  # the image spans two view widths
        gridspec_kw={"left": 0.04, "right": 0.96, "bottom": 0.04, "top": 0.87, "hspace": 0.2, "wspace": 0.1},
    )
    ax = axes["scene"]
    _show_image(ax, pixels, width, height)
    for v in range(2):
        _box(ax, pair.regions[v], VIEW_COLORS[v], lw=1.2, ls="--")
    for v, corner in enumerate(("top-left", "bottom-right")):
        _box(ax, pair.crops[v], VIEW_COLORS[v], lw=2.2, label=f"{v + 1}: {pair.kinds[v]}", corner=corner)
    if pair.fallback:
        ax.set_title("fallback: no usable proposal", fontsize=8, color=FALLBACK_COLOR)
    for v in range(2):
        view_ax = axes[f"v{v + 1}"]
        view_ax.imshow(np.asarray(crop_view(image, pair.crops[v], view_size)))
        view_ax.set_xticks([])
        view_ax.set_yticks([])
        for spine in view_ax.spines.values():
            spine.set_edgecolor(VIEW_COLORS[v])
            spine.set_linewidth(3)
        view_ax.set_title(f"view {v + 1}: {pair.kinds[v]}", fontsize=8, color="black")


def _draw_header(
    sub: SubFigure,
    pixels: np.ndarray,
    width: int,
    height: int,
    proposals: np.ndarray,
    gt_boxes: np.ndarray | None,
    topk: int,
    title: str | None,
) -> None:
    ax = sub.subplots(gridspec_kw={"left": 0.02, "right": 0.98, "bottom": 0.02, "top": 0.86})
    _show_image(ax, pixels, width, height)
    shown = proposals[:topk]
    for rank, box in enumerate(shown):
        _box(ax, box, PROPOSAL_COLOR, lw=1.5, label=str(rank + 1))
    if gt_boxes is not None:
        for box in gt_boxes:
            _box(ax, box, GT_COLOR, lw=1.2, ls=":")
    note = f"top-{len(shown)} of {len(proposals)} proposals" if len(proposals) else "no proposals"
    ax.set_title(
        f"{title}\n{note}" if title else note, fontsize=10, color="black" if len(proposals) else FALLBACK_COLOR
    )


def _legend(sub: SubFigure, with_gt: bool) -> None:
    handles = [
        Line2D([], [], color=PROPOSAL_COLOR, lw=1.5, label="proposal (rank)"),
        Line2D([], [], color=VIEW_COLORS[0], lw=2.2, label="crop of view 1"),
        Line2D([], [], color=VIEW_COLORS[1], lw=2.2, label="crop of view 2"),
        Line2D([], [], color="grey", lw=1.0, ls="--", label="region a crop was sampled in"),
    ]
    if with_gt:
        handles.insert(1, Line2D([], [], color=GT_COLOR, lw=1.2, ls=":", label="ground truth"))
    sub.legend(
        handles=handles,
        loc="center",
        fontsize=9,
        frameon=False,
        title="views: crops resized,\nno colour augmentation",
        title_fontsize=9,
    )


def figure_size(width: int, height: int, num_policies: int, pairs: int) -> tuple[float, float]:
    """Size in inches of the :func:`draw_view_pairs` figure of a ``width x height`` image."""
    cell_w = 3.0
    cell_h = cell_w * height / width + cell_w / 2 + 0.6  # image with boxes, views below, titles
    return (cell_w * max(pairs, 2), cell_h * (1 + num_policies))


def draw_view_pairs(
    image: Image.Image,
    proposals,
    policy: ViewPairPolicy | Sequence[ViewPairPolicy],
    pairs: int,
    rng: np.random.Generator,
    gt_boxes=None,
    *,
    topk: int | None = None,
    view_size: int = 112,
    title: str | None = None,
    fig: Figure | SubFigure | None = None,
) -> Figure | SubFigure:
    """Draws sampled view pairs of one image for one or several policies.

    Args:
        image: The RGB image; boxes are in its pixel coordinates.
        proposals: ``[N, 4]`` xyxy proposals, best first, given to the policies.
        policy: A policy or a sequence of policies; each gets one row of ``pairs`` view pairs.
        pairs: View pairs drawn per policy.
        rng: Generator the policies sample with.
        gt_boxes: Optional ``[M, 4]`` ground-truth boxes, drawn dotted in the header.
        topk: Proposals drawn in the header (default: the first policy's ``topk``).
        view_size: Side in pixels of the resized views.
        title: Header title (e.g. the image name).
        fig: Figure or subfigure to draw into; a new figure sized to the content when ``None``.

    Returns:
        The figure drawn into.
    """
    policies = [policy] if isinstance(policy, ViewPairPolicy) else list(policy)
    if not policies:
        raise ValueError("draw_view_pairs needs at least one policy")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    image = image.convert("RGB")
    width, height = image.size
    proposals = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    gt = None if gt_boxes is None else np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    topk = policies[0].topk if topk is None else topk
    pixels = _display_copy(image)

    if fig is None:
        fig = Figure(figsize=figure_size(width, height, len(policies), pairs), layout=None)
        FigureCanvasAgg(fig)
    rows = fig.subfigures(1 + len(policies), 1, height_ratios=[1.0] * (1 + len(policies)))
    header = rows[0].subfigures(1, 2, width_ratios=[1.0, 1.0])
    _draw_header(header[0], pixels, width, height, proposals, gt, topk, title)
    _legend(header[1], gt is not None)
    for row, pol in zip(rows[1:], policies, strict=True):
        row.suptitle(f"{pol.name}  (delta={pol.delta:g}, top-k={pol.topk})", fontsize=11, fontweight="bold")
        row.set_facecolor("#f4f4f4")
        cells = row.subfigures(1, pairs)
        for cell in np.atleast_1d(cells):
            _draw_pair(cell, image, pixels, pol.sample(width, height, proposals, rng), view_size)
    return fig


def draw_records(
    records,
    store,
    indices: Sequence[int],
    policies: Sequence[ViewPairPolicy],
    pairs: int = 4,
    seed: int = 0,
    topk: int | None = None,
    view_size: int = 112,
) -> Figure:
    """One figure with a :func:`draw_view_pairs` panel per chosen image of a dataset, stacked.

    Args:
        records: The dataset (:class:`~objcrop.data.records.Records`); its boxes are drawn as ground truth.
        store: Proposals, anything with ``boxes_of(i)`` (best first).
        indices: Record indices of the images to draw.
        policies: Policies, one row each per image.
        pairs: View pairs per policy.
        seed: Image ``i`` samples with ``default_rng([seed, i])``, so its panel does not depend on
            which other images are drawn.
        topk: Proposals drawn in each header (default: the first policy's ``topk``).
        view_size: Side in pixels of the resized views.
    """
    from objcrop.data.images import load_image

    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("draw_records needs at least one image index")
    for i in indices:
        if not 0 <= i < len(records):
            raise ValueError(f"image index {i} out of range: the dataset has {len(records)} images")
    sizes = [figure_size(*records.size(i), len(policies), pairs) for i in indices]
    fig = Figure(figsize=(max(w for w, _ in sizes), sum(h for _, h in sizes)), layout=None)
    FigureCanvasAgg(fig)
    panels = fig.subfigures(len(indices), 1, height_ratios=[h for _, h in sizes], squeeze=False)[:, 0]
    for panel, i in zip(panels, indices, strict=True):
        image = load_image(records.path(i))
        width, height = records.size(i)
        if image.size != (width, height):
            log.warning(
                "%s: decoded size %dx%d differs from the annotated %dx%d; resizing to the annotation",
                records.path(i),
                *image.size,
                width,
                height,
            )
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        draw_view_pairs(
            image,
            store.boxes_of(i),
            policies,
            pairs,
            np.random.default_rng([seed, i]),
            gt_boxes=records.boxes_of(i),
            topk=topk,
            view_size=view_size,
            title=f"#{i}  {records.key(i)}  ({width}x{height})",
            fig=panel,
        )
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100, check: bool = True) -> Path:
    """Writes ``fig`` as a PNG atomically (temporary file in the same folder, then rename).

    Args:
        fig: The figure.
        path: The PNG file to write.
        dpi: Resolution.
        check: Refuse to replace a file at ``path`` that objcrop did not write (see
            :func:`~objcrop.analysis.png.check_png_out`); False for a file inside a folder objcrop manages
            (a run's ``loss.png``, the demo's report).

    Raises:
        ValueError: ``path`` holds a file objcrop did not write (with ``check``).
    """
    if check:
        check_png_out(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, facecolor="white", metadata=PNG_METADATA)
    return Path(path)
