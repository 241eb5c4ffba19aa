"""Atomic checkpoints that keep the last k, and loading that falls back past a damaged file.

The folder is created and checked writable before training starts, and the temp files a killed save
left behind (``.ckpt-<step>.pt.<random>.tmp``, the names :func:`objcrop.io.atomic_open` gives) are
removed then: only those, and only in the checkpoint folder.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from objcrop.io import atomic_torch_save, load_error_reason
from objcrop.ssl.errors import CheckpointError

__all__ = ["CheckpointError", "Checkpointer", "load_checkpoint"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
# atomic_open's temp file for ckpt-<step>.pt: tempfile.mkstemp(prefix=".ckpt-<step>.pt.", suffix=".tmp"),
# whose random part is drawn from [a-z0-9_].
_TEMP_NAME = re.compile(r"^\.ckpt-\d{8,}\.pt\.[a-z0-9_]+\.tmp$")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True``; any failure becomes a :class:`CheckpointError`
    that names the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint not found: {path}") from err
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint: {load_error_reason(err)}") from err
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} lacks the 'model' and 'step' entries of an objcrop checkpoint")
    return state


class Checkpointer:
    """Writes ``ckpt-<step>.pt`` files atomically in ``folder`` and keeps the newest ``keep_last``."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last

    def prepare(self) -> None:
        """Creates the folder and checks that a file can be written in it, so that a bad ``train.out``
        fails before the first step rather than at the first save.

        Raises:
            OSError: Naming the folder, when it cannot be created or written to.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.folder):  # unnamed where the OS allows: nothing to clean up
                pass
        except OSError as err:
            raise OSError(
                err.errno, f"checkpoint folder {self.folder} cannot be created or written to: {err.strerror}"
            ) from err

    def remove_stale_temp_files(self) -> list[Path]:
        """Removes the temp files of saves that were killed before their rename; returns them.

        Call it before training starts (no save is in flight then). Only names of objcrop's own
        checkpoint temp files (``.ckpt-<step>.pt.<random>.tmp``) are touched.
        """
        if not self.folder.is_dir():
            return []
        stale = sorted(p for p in self.folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file())
        for path in stale:
            path.unlink(missing_ok=True)
            logger.info("removed %s, the temp file of a checkpoint save that did not finish", path)
        return stale

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.folder / f"ckpt-{step:08d}.pt"
        atomic_torch_save(state, path)
        for old in self.paths()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; damaged ones are logged and skipped. ``None`` if there is none.

        Raises:
            CheckpointError: When checkpoints exist but none of them loads (training from scratch
                would then silently discard the run).
        """
        paths = self.paths()
        for path in reversed(paths):
            try:
                return load_checkpoint(path, map_location), path
            except CheckpointError as err:
                logger.error("%s; falling back to the previous checkpoint", err)
        if paths:
            raise CheckpointError(
                f"none of the {len(paths)} checkpoints in {self.folder} loads (see the errors above); "
                "remove them to start over"
            )
        return None

    def set_aside(self) -> Path | None:
        """Renames the folder of existing checkpoints to ``<folder>.replaced-<time>`` (for a fresh run in
        the same place); returns the new name, or ``None`` when there was nothing to move."""
        if not self.paths():
            return None
        target = self.folder.with_name(f"{self.folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        self.folder.rename(target)
        return target
