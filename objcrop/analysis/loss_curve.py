"""The pretraining loss curve: ``log.csv`` drawn as ``loss.png``, and the monitor that does it at the
end of a run (``objcrop pretrain`` passes it to the trainer)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING

from objcrop.ssl.monitors import Monitor

if TYPE_CHECKING:
    from objcrop.ssl.trainer import Trainer

__all__ = ["LossPlot", "plot_loss_log"]


def plot_loss_log(log_csv: str | os.PathLike, png: str | os.PathLike) -> Path | None:
    """Plots the ``loss`` column of a training ``log.csv`` against ``step``; ``None`` (and no file) when
    the log is missing or has no rows."""
    log_csv = Path(log_csv)
    if not log_csv.exists():
        return None
    with open(log_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    from objcrop.analysis.plots import plot_curves  # matplotlib: only when there is something to draw

    steps = [int(r["step"]) for r in rows]
    curve = {"loss": (steps, [float(r["loss"]) for r in rows])}
    # check=False: loss.png sits in the run folder objcrop manages, beside its checkpoints
    return plot_curves(curve, png, xlabel="step", ylabel="loss", check=False)


class LossPlot(Monitor):
    """Writes ``<train.out>/loss.png`` from the run's ``log.csv`` when training ends."""

    name = "loss plot"

    def on_fit_end(self, trainer: Trainer) -> None:
        """Draws the whole run's loss (a resumed run's log holds the earlier steps too)."""
        plot_loss_log(trainer.out / "log.csv", trainer.out / "loss.png")
