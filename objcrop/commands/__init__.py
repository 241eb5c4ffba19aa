"""The subcommands of ``objcrop``: one module each with ``register(subparsers)``; see :mod:`objcrop.cli`."""
