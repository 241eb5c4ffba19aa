"""The proposal backends: what ``objcrop propose --backend`` builds.

:data:`BACKENDS` (the table in :mod:`objcrop.registry`, one line per backend) maps a name to a factory,
``factory(**options) -> proposer``, where a proposer is
``proposer(image HxWx3 uint8 RGB) -> (boxes float32 [n, 4] xyxy, scores float32 [n])``, best first.
The table holds ``"module:Class"`` strings, imported when a backend is built, so listing the names
imports no backend; a backend with an optional dependency imports it inside its factory (see
:func:`require`), so that a missing dependency is a clear message naming the pip requirement.

``"gt"`` (:data:`GT`) is the one backend that reads annotations instead of pixels, so it has no
per-image proposer and no entry in :data:`BACKENDS`. It needs no store either: ``--proposals gt``
builds the GT proposals in memory (:meth:`ProposalStore.from_records`); ``objcrop propose
--backend gt`` writes the same boxes as a store folder for tools that want one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from objcrop.registry import BACKENDS

__all__ = ["GT", "BACKENDS", "MissingDependencyError", "backend_names", "backend_options", "make_proposer", "require"]

GT = "gt"


class MissingDependencyError(ValueError):
    """A backend's optional dependency is not installed."""


def backend_names() -> list[str]:
    """Every backend ``objcrop propose`` knows, ``"gt"`` included."""
    return [GT, *sorted(BACKENDS)]


def require(module: str, backend: str, install: str):
    """Imports ``module`` for ``backend``, or raises :class:`MissingDependencyError` saying what
    to install (``install`` is the pip requirement, e.g. ``"opencv-contrib-python-headless"``)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"proposal backend {backend!r} needs the module {module!r} ({err}); install it with: pip install {install}"
        ) from err


def backend_options(name: str) -> list[str]:
    """Names of the options the backend's factory takes."""
    return [p for p in inspect.signature(_factory(name)).parameters if p not in ("self", "args", "kwargs")]


def _factory(name: str) -> Callable:
    if name == GT:
        raise ValueError(
            "'gt' proposals are the annotated boxes, not a per-image proposer: pass '--proposals gt' where "
            "proposals are read (no store needed), or run 'objcrop propose --backend gt' to write them as a store"
        )
    if name not in BACKENDS:
        raise ValueError(f"unknown proposal backend {name!r}; choose one of: {', '.join(backend_names())}")
    return BACKENDS[name]


def make_proposer(name: str, **options):
    """Builds the proposer of backend ``name`` with ``options``.

    Raises:
        ValueError: Unknown backend, or an option the backend does not take.
        MissingDependencyError: The backend's optional dependency is not installed.
    """
    factory = _factory(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise ValueError(
            f"bad options {sorted(options)} for proposal backend {name!r} ({err}); "
            f"it takes: {', '.join(backend_options(name)) or 'no options'}"
        ) from None
    return factory(**options)
