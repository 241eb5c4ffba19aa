"""Result files: a command's numbers together with where they come from (commit, machine, date, command).

A result file is one JSON object ``{"kind", "commit", "machine", "date", "command", "versions", ...data}``.
``benchmarks/results_tables.py`` renders README tables from such files, so the numbers there are never typed.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from objcrop.io import check_replaceable, json_is_ours, write_json_atomic

PROVENANCE_KEYS = ("commit", "machine", "date", "command")


def current_command() -> str:
    """The command line of this process as the user typed it (best effort), e.g. ``objcrop analyze coverage ...``."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("objcrop", "__main__.py"):
        return shlex.join(["objcrop", *sys.argv[1:]])
    if program.endswith(".py"):
        return shlex.join(["python", sys.argv[0], *sys.argv[1:]])
    return f"objcrop called from Python ({program or 'interpreter'})"


def git_commit(where: Path | None = None) -> str:
    """Short commit of the checkout holding ``where`` (default: objcrop's), marked when it has uncommitted changes.

    Returns ``"unknown (not a git checkout)"`` for an installed package: the file then says so instead of guessing.
    """
    folder = str(where or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "-C", folder, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} (with uncommitted changes)" if changed else commit


def machine() -> str:
    """CPU model, core count and the load when the run started: rates depend on all three."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores{load}"


def versions() -> dict[str, str]:
    """Versions of the libraries a result may depend on (read from metadata, nothing is imported)."""
    found = {"python": platform.python_version()}
    for name in ("objcrop", "torch", "torchvision", "numpy", "opencv-contrib-python-headless", "opencv-contrib-python"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def provenance(command: str | None = None) -> dict:
    """The provenance fields of a result file measured now, by ``command`` (default: this process's)."""
    return {
        "commit": git_commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or current_command(),
        "versions": versions(),
    }


def is_result_file(path: Path) -> bool:
    """Whether ``path`` is a result file objcrop wrote: a JSON object with a string ``kind`` and every
    provenance field (``commit``, ``machine``, ``date``, ``command``, ``versions``), which
    :func:`write_result` always writes (so also result files older than this check are recognised)."""

    def proves(obj: dict) -> bool:
        return (
            isinstance(obj.get("kind"), str)
            and isinstance(obj.get("versions"), dict)
            and set(PROVENANCE_KEYS) <= set(obj)
        )

    return json_is_ours(path, proves)


def check_result_out(path: str | os.PathLike) -> Path:
    """``path`` when a result file may be written there: absent, or a result file objcrop wrote.

    Raises:
        ValueError: ``path`` holds another file (it would be replaced).
        IsADirectoryError: ``path`` is a folder.
    """
    return check_replaceable(path, is_result_file)


def write_result(path: str | os.PathLike, kind: str, data: dict, command: str | None = None) -> dict:
    """Writes ``data`` as a result file of ``kind`` (atomically) with the provenance of this run; returns it.

    Raises:
        ValueError: ``path`` holds a file that is not an objcrop result file (see :func:`check_result_out`).
    """
    check_result_out(path)
    clash = sorted(set(data) & {"kind", "versions", *PROVENANCE_KEYS})
    if clash:
        raise ValueError(f"result data must not hold the provenance keys {clash}")
    result = {"kind": kind, **provenance(command), **data}
    write_json_atomic(path, result, indent=1)
    return result
