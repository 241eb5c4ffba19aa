"""The ``objcrop`` command line. Each subcommand lives in ``objcrop/commands/<name>.py`` and
exposes ``register(subparsers)``; this module only wires them together."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

# Subcommand modules, in the order ``objcrop --help`` lists them.
COMMANDS = [
    "objcrop.commands.demo",
    "objcrop.commands.synth",
    "objcrop.commands.openimages_subset",
    "objcrop.commands.propose",
    "objcrop.commands.bing",
    "objcrop.commands.show",
    "objcrop.commands.analyze",
    "objcrop.commands.pretrain",
    "objcrop.commands.export",
    "objcrop.commands.linear",
    "objcrop.commands.knn",
    "objcrop.commands.supervised",
    "objcrop.commands.detect",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``objcrop`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="objcrop", description="Object-aware cropping for self-supervised learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _os_error_message(err: OSError) -> str:
    """``path: reason`` for an OSError that names a file (its ``str`` may lack the path)."""
    if err.filename is None:
        return str(err)
    reason = err.strerror or str(err)
    target = f" -> {err.filename2}" if err.filename2 is not None else ""
    return f"{err.filename}{target}: {reason}"


# What an expected failure of a subcommand becomes: (exception type, exit code, message). The first
# matching row wins, so subclasses come before their bases. Bad input (a config or dataset error, a
# path that is a file instead of a folder, a folder without permission) is exit code 2 with one line
# naming the file; Ctrl-C is 130 like any shell command killed by SIGINT. Anything else is a bug and
# keeps its traceback.
EXIT_CODES: tuple[tuple[type[BaseException], int, Callable[[BaseException], str]], ...] = (
    (KeyboardInterrupt, 130, lambda err: "interrupted"),
    (OSError, 2, _os_error_message),  # FileNotFoundError, PermissionError, IsADirectoryError, ...
    (ValueError, 2, str),  # ConfigError, StaleStoreError, ImageReadError, ... are ValueErrors
)


def main(argv: list[str] | None = None) -> int:
    """Runs ``objcrop`` with ``argv`` and returns the exit code (see :data:`EXIT_CODES`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except BaseException as err:
        for kind, code, message in EXIT_CODES:
            if isinstance(err, kind):
                print(f"objcrop {args.command}: error: {message(err)}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())
