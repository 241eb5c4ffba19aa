"""The errors of pretraining, in one place, so that callers (the CLI's exit codes above all) need not
import the modules that raise them.

All three are for expected failures with a message meant for the user: a bad config (exit code 2), an
unreadable checkpoint (2), a loss or weights gone NaN/inf (3).
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "NonFiniteLossError"]


class ConfigError(ValueError):
    """A config names an unknown key, a bad value or a missing file."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a checkpoint."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting good checkpoints."""
