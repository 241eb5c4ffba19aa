"""What objcrop may touch in a proposal store folder, and the lock that keeps two builds apart.

objcrop deletes or replaces only files it can show it wrote. A store folder is objcrop's when it
holds the marker file :data:`MARKER_FILE` (written when objcrop first writes into the folder), an
objcrop ``meta.json`` (stores written before the marker existed) or an objcrop ``shards/build.json``.
A folder that is not objcrop's but already holds a file or folder with one of the store's names is
refused by name; other files in it are never touched. Deleting always goes by a list of names
(the store's arrays, the chunks of one build), never by removing a whole tree.

The lock is a file created with ``O_EXCL`` holding the owner's pid and host. A whole-folder
operation (an unsharded build, a merge, a ``gt`` store) takes :data:`LOCK_PREFIX` ``.lock`` and
refuses while any shard lock is held; a shard run (``--shard i/n``, ``n > 1``) takes its own lock
and refuses while the whole-folder lock is held, so the shards of one build can run at the same
time. A lock whose pid is dead on this host is stale and taken over; a lock of another host cannot
be checked and is reported with the path to delete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from objcrop.io import write_json_atomic
from objcrop.proposals.store import META_FILE, STORE_FILES

__all__ = [
    "MARKER_FILE",
    "SHARDS_DIR",
    "BUILD_FILE",
    "LOCK_PREFIX",
    "FolderLockedError",
    "claim_folder",
    "folder_lock",
    "read_objcrop_json",
    "remove_files",
    "remove_store_files",
]

log = logging.getLogger(__name__)

MARKER_FILE = ".objcrop-store"
SHARDS_DIR = "shards"
BUILD_FILE = "build.json"
LOCK_PREFIX = ".objcrop-propose"
# An unreadable lock file younger than this is a lock being written right now, not a dead one.
_FRESH_LOCK_S = 30.0
_HELD: set[str] = set()  # locks held by this process


class FolderLockedError(ValueError):
    """Another objcrop process is writing the folder."""


def read_objcrop_json(path: Path, keys: Iterable[str]) -> dict | None:
    """The JSON object in ``path`` when it is one objcrop wrote (a dict holding every key of
    ``keys``), else None (missing, unreadable or someone else's file)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and all(k in data for k in keys) else None


def _is_objcrop_folder(folder: Path) -> bool:
    return (
        (folder / MARKER_FILE).is_file()
        or read_objcrop_json(folder / META_FILE, ("format_version", "backend")) is not None
        or read_objcrop_json(folder / SHARDS_DIR / BUILD_FILE, ("format_version", "dataset")) is not None
    )


def claim_folder(folder: str | os.PathLike) -> Path:
    """Makes ``folder`` a store folder of objcrop's: creates it if needed and writes the marker,
    unless it already holds store-named files that objcrop did not write.

    Raises:
        ValueError: ``folder`` is not objcrop's and holds a store file or ``shards/`` (named).
        OSError: ``folder`` cannot be created (a file of that name, no permission).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not _is_objcrop_folder(folder):
        foreign = sorted(set(os.listdir(folder)) & {*STORE_FILES, SHARDS_DIR})
        if foreign:
            raise ValueError(
                f"{folder / foreign[0]} was not written by objcrop ({folder} has no {MARKER_FILE} marker) and "
                "would be replaced or deleted; choose another output folder, or move it away"
            )
    if not (folder / MARKER_FILE).is_file():  # also for older stores: meta.json goes away while rewriting
        write_json_atomic(folder / MARKER_FILE, {"written_by": "objcrop", "what": "proposal store"})
    return folder


def remove_files(folder: Path, names: Iterable[str]) -> None:
    """Deletes ``folder/name`` for each listed name (missing ones are fine), and the temporary
    files that objcrop's atomic writes of those names may have left after a kill."""
    names = set(names)
    for name in names:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(folder):
            stem, dot, rest = entry[1:].rpartition(".")  # ".<name>.<random>.tmp" -> "<name>.<random>", "tmp"
            if entry.startswith(".") and dot and rest == "tmp" and stem.rpartition(".")[0] in names:
                (folder / entry).unlink(missing_ok=True)


def remove_store_files(folder: Path) -> None:
    """Deletes the arrays and ``meta.json`` of the store in ``folder`` (``meta.json`` first, so an
    interrupted removal leaves an incomplete store, not a mixed one)."""
    remove_files(folder, [META_FILE])
    remove_files(folder, STORE_FILES)


# ---------------------------------------------------------------------- lock


def _lock_path(folder: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None or shard[1] == 1:
        return folder / f"{LOCK_PREFIX}.lock"
    return folder / f"{LOCK_PREFIX}-{shard[0]}-of-{shard[1]}.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is another user's
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """Who holds ``lock``: ``{"pid", "host"}``, or None when it is free or stale."""
    try:
        text = lock.read_text(encoding="utf-8")
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        pid, host = int(holder["pid"]), str(holder["host"])
    except (ValueError, TypeError, KeyError):
        # Being written this very moment, or left by a crash between create and write.
        return {"pid": "?", "host": "?"} if age < _FRESH_LOCK_S else None
    if host != socket.gethostname():
        return {"pid": pid, "host": host}  # cannot look at another machine's processes
    if pid == os.getpid():
        # Not held by this process (see _HELD): a dead process's lock whose pid came back to us.
        return None if str(lock) not in _HELD else {"pid": pid, "host": host}
    return {"pid": pid, "host": host} if _pid_alive(pid) else None


def _locked_error(folder: Path, lock: Path, holder: dict) -> FolderLockedError:
    where = f" on {holder['host']}" if holder["host"] not in ("?", socket.gethostname()) else ""
    return FolderLockedError(
        f"another objcrop propose (pid {holder['pid']}{where}) is writing {folder}; wait for it to end "
        f"(if it is not running any more, delete {lock})"
    )


def _acquire(folder: Path, lock: Path) -> None:
    content = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode("utf-8")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None:
                raise _locked_error(folder, lock, holder) from None
            log.warning("%s: removing the stale lock of a process that is gone", lock)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        _HELD.add(str(lock))
        return
    raise FolderLockedError(f"cannot take the lock {lock} of {folder}: it keeps coming back")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, shard: tuple[int, int] | None = None) -> Iterator[None]:
    """Holds the lock of ``folder`` (which must exist) for a whole-folder operation
    (``shard`` None or ``(0, 1)``) or for one shard ``(i, n)`` of a build.

    Raises:
        FolderLockedError: Another live process holds this lock or a conflicting one.
    """
    folder = Path(folder)
    own = _lock_path(folder, shard)
    _acquire(folder, own)
    try:
        if own == _lock_path(folder, None):
            others = [p for p in folder.glob(f"{LOCK_PREFIX}*.lock") if p != own]
        else:
            others = [_lock_path(folder, None)]
        for other in others:
            holder = _holder(other)
            if holder is not None:
                raise _locked_error(folder, other, holder)
        yield
    finally:
        _HELD.discard(str(own))
        own.unlink(missing_ok=True)
