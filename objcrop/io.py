"""Atomic file writes: a temporary file in the target's folder, then a rename over the target.

A reader (or a run restarted after ``kill -9``) sees either the old file or the complete new one,
never a partial write. The rename is atomic on POSIX filesystems; callers that must also survive a
power loss (checkpoints) fsync before it.

A rename replaces whatever is at the target, so a command that writes a file the user names checks it first
with :func:`check_replaceable`: only a file that objcrop can prove it wrote (by the file's content, in the
format's own way) is replaced.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "load_error_reason",
    "atomic_open",
    "atomic_torch_save",
    "check_replaceable",
    "json_is_ours",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = False) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes; mode must contain 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    import torch  # here, not at the top: objcrop.io serves torch-free code too (``objcrop --help``)

    with atomic_open(path, "wb", fsync=True) as f:
        torch.save(obj, f)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None, **kwargs) -> None:
    """Writes ``obj`` as JSON (compact unless ``indent`` is given) followed by a newline."""
    separators = (",", ":") if indent is None else None
    write_text_atomic(path, json.dumps(obj, indent=indent, separators=separators, **kwargs) + "\n")


def check_replaceable(path: str | os.PathLike, is_ours: Callable[[Path], bool]) -> Path:
    """``path`` when a file may be written there: absent, or a file that ``is_ours`` proves objcrop wrote.

    Args:
        path: The output file the user named.
        is_ours: Reads the existing file and says whether its content proves objcrop wrote it; it must
            return False (not raise) for a file it cannot read or parse.

    Raises:
        ValueError: ``path`` holds a file objcrop did not write (it would be replaced).
        IsADirectoryError: ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if (path.exists() or path.is_symlink()) and not is_ours(path):
        raise ValueError(
            f"{path} was not written by objcrop and would be replaced; choose another --out, or move it away"
        )
    return path


def json_is_ours(path: Path, proves: Callable[[dict], bool]) -> bool:
    """Whether ``path`` is a JSON object for which ``proves`` holds (False for anything unreadable)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and bool(proves(obj))


def load_error_reason(err: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` failed, for an error message naming the file.

    torch's own texts run to several lines (the weights_only one explains its 2.6 default change and asks for a
    bug report), which would break the CLI's one-line errors; objcrop never falls back to pickle.
    """
    import pickle

    name = type(err).__name__
    if isinstance(err, pickle.UnpicklingError):
        return "not a tensor file that loads without pickle (objcrop loads with weights_only=True)"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{name}: {lines[0]}" if lines else name
