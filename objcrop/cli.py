"""The ``objcrop`` command line. Each subcommand lives in ``objcrop/commands/<name>.py`` and
exposes ``register(subparsers)``; this module only wires them together."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

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
    parser = argparse.ArgumentParser(prog="objcrop", description="Object-aware cropping for self-supervised learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        print(f"objcrop {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
