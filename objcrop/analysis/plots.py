"""Small matplotlib helpers shared by the reports: line curves and bar charts written as PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

from objcrop.analysis.png import PNG_METADATA, check_png_out
from objcrop.io import atomic_open

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["save_png", "plot_curves", "plot_bars"]


def save_png(fig, path: str | os.PathLike, dpi: int = 120, check: bool = False) -> Path:
    """Saves ``fig`` as PNG atomically and closes it.

    Args:
        fig: The figure (closed afterwards).
        path: The PNG file to write.
        dpi: Resolution.
        check: Refuse to replace a file at ``path`` that objcrop did not write (see
            :func:`~objcrop.analysis.png.check_png_out`). Off by default: these plots go into folders a run
            manages (a run's ``loss.png``, the demo's report, the benchmarks' output folders), which may
            hold PNGs objcrop wrote before its PNGs were marked; pass True for a file the user names.
    """
    try:
        if check:
            check_png_out(path)
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=dpi, bbox_inches="tight", format="png", metadata=PNG_METADATA)
    finally:
        plt.close(fig)
    return Path(path)


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    logx: bool = False,
    check: bool = False,
) -> Path:
    """One line per ``name -> (x, y)`` (``check``: see :func:`save_png`)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, linewidth=1.5)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return save_png(fig, path, check=check)


def plot_bars(
    values: Mapping[str, float],
    path: str | os.PathLike,
    errors: Mapping[str, tuple[float, float]] | None = None,
    ylabel: str = "",
    title: str = "",
    reference: float | None = None,
    check: bool = False,
) -> Path:
    """A bar per ``name -> value``, with optional ``(lo, hi)`` intervals and a dashed reference line.

    Only the names in ``errors`` get an error bar: a row without an interval (one seed) gets none,
    rather than a zero-width one that reads as "no variance". ``check``: see :func:`save_png`.
    """
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names)), 4))
    heights = [values[n] for n in names]
    ax.bar(names, heights, color="#4C72B0")
    with_errors = [i for i, n in enumerate(names) if errors and n in errors]
    if with_errors:
        lows = [values[names[i]] - errors[names[i]][0] for i in with_errors]
        highs = [errors[names[i]][1] - values[names[i]] for i in with_errors]
        ax.errorbar(
            with_errors, [heights[i] for i in with_errors], yerr=[lows, highs], fmt="none", ecolor="black", capsize=4
        )
    for i, h in enumerate(heights):
        ax.text(i, h, f"{h:.1f}", ha="center", va="bottom", fontsize=9)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.legend()
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    return save_png(fig, path, check=check)
