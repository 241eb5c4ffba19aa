"""The pretraining logs: ``log.csv`` (always), ``eval.csv`` (monitors) and TensorBoard (when installed).

Only the main process writes. A resumed run keeps the rows up to the step it resumes from: the
later ones are recomputed, so the log of a resumed run equals the uninterrupted run's.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

__all__ = ["TrainLogs"]

logger = logging.getLogger(__name__)


class TrainLogs:
    """CSV (always) and TensorBoard (when installed and enabled) logs in ``out``.

    Args:
        out: The run's folder (``train.out``).
        enabled: ``False`` on the processes that do not log (every rank but 0): then nothing is written.
        tensorboard: Also write TensorBoard events to ``out/tensorboard``.
        resume_step: The step the run resumes from: later rows of an existing ``log.csv`` are dropped.
    """

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = out / "log.csv"
        self.writer = None
        self.fields: list[str] | None = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the rows up to the resumed step: the rest is recomputed
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self.fields = list(rows[0].keys()) if rows else None
            _rewrite_csv(self.path, rows, self.fields)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed; writing the CSV log only")
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, stats: dict[str, float]) -> None:
        """Appends a training row to ``log.csv`` (its columns are the first row's) and ``train/`` scalars."""
        if not self.enabled:
            return
        row = {"step": step, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in stats.items()}}
        if self.fields is None:
            self.fields = list(row)
            _rewrite_csv(self.path, [], self.fields)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)
        if self.writer is not None:
            for key, value in stats.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def write_eval(self, step: int, epoch: int, stats: dict[str, float]) -> None:
        """Appends evaluation results (the monitors') to ``eval.csv`` and TensorBoard's ``eval/``."""
        if not self.enabled:
            return
        path = self.path.with_name("eval.csv")
        fields = ["step", "epoch", *stats]
        if path.exists():  # monitors due at different epochs give rows with other columns: widen the header
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows, known = list(reader), list(reader.fieldnames or [])
            fields = known + [k for k in fields if k not in known]
            if fields != known:
                _rewrite_csv(path, rows, fields)
        else:
            _rewrite_csv(path, [], fields)
        with open(path, "a", newline="", encoding="utf-8") as f:
            row = {"step": step, "epoch": epoch, **{k: f"{v:.4f}" for k, v in stats.items()}}
            csv.DictWriter(f, fieldnames=fields).writerow(row)
        if self.writer is not None:
            for key, value in stats.items():
                self.writer.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        """Flushes and closes TensorBoard's writer."""
        if self.writer is not None:
            self.writer.close()


def _rewrite_csv(path: Path, rows: list[dict], fields: list[str] | None) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if fields:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, path)
