"""From checkpoints to backbones: the architecture a run trained, its backbone weights, and the sidecar
that names the architecture of an exported state dict.

This module sits below both the trainer's callers and :mod:`objcrop.evaluate`: export, the evaluation
loaders and detection transfer all read checkpoints through it, so the architecture is looked up in one
place. It is read from the method itself (:attr:`~objcrop.ssl.base.SSLMethod.arch` and
``small_images``), built on the meta device from the checkpoint's config: no memory, no weights, and
no assumption about which constructor argument names the backbone.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from objcrop.io import check_replaceable, json_is_ours, write_json_atomic
from objcrop.ssl.backbones import trunk_weights
from objcrop.ssl.base import SSLMethod, build_method
from objcrop.ssl.checkpoint import load_checkpoint

__all__ = [
    "BackboneArch",
    "arch_sidecar",
    "backbone_from_checkpoint",
    "check_state_dict_out",
    "checkpoint_arch",
    "checkpoint_backbone",
    "is_objcrop_checkpoint",
    "mark_state_dict",
    "method_arch",
    "read_arch_sidecar",
    "state_dict_is_ours",
    "write_arch_sidecar",
]


class BackboneArch(NamedTuple):
    """A backbone's architecture: its name (``resnet50``, ``timm:<name>``) and whether it has the
    small-image stem."""

    arch: str
    small_images: bool


def _meta_method(config: Mapping[str, Any]) -> SSLMethod:
    with torch.device("meta"):  # structure only: no memory is allocated, no weights are drawn
        return build_method(config)


def method_arch(config: Mapping[str, Any]) -> BackboneArch:
    """The backbone a pretraining config's method declares (its ``arch`` and ``small_images``)."""
    return _declared_arch(json.dumps(config["method"], sort_keys=True))


@functools.lru_cache(maxsize=64)
def _declared_arch(method_json: str) -> BackboneArch:
    # Cached by the method section: a meta build takes a fraction of a second, and evaluation asks for the
    # architecture of the same checkpoint several times (feature cache keys, loading).
    method = _meta_method({"method": json.loads(method_json)})
    return BackboneArch(str(method.arch), bool(method.small_images))


def is_objcrop_checkpoint(state: Mapping[str, Any]) -> bool:
    """Whether a loaded file is a checkpoint of ``objcrop pretrain`` (rather than a plain state dict)."""
    return "model" in state and "config" in state and "step" in state


def checkpoint_arch(state: Mapping[str, Any], path: str | os.PathLike) -> BackboneArch:
    """The backbone of the loaded checkpoint ``state`` (read from ``path``, named in errors).

    Raises:
        ValueError: The checkpoint's config has no readable method, or that method does not build.
    """
    try:
        config = json.loads(state["config"])
        config["method"]["name"]
    except (TypeError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: checkpoint config has no readable 'method' section") from err
    try:
        return method_arch(config)
    except (TypeError, ValueError) as err:  # an unknown method or argument (ConfigError is a ValueError)
        raise ValueError(f"{path}: the checkpoint's method does not build: {err}") from err


def checkpoint_backbone(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], BackboneArch]:
    """The backbone weights of an objcrop checkpoint and their architecture.

    The weights have torchvision ResNet names (no ``fc``) or, for a ``timm:<name>`` backbone, timm's names
    (no classifier head).

    Raises:
        CheckpointError: The file is missing, damaged or not a checkpoint.
    """
    state = load_checkpoint(path)
    method = _meta_method(json.loads(state["config"]))
    method.load_state_dict(state["model"], assign=True)
    weights = {k: v.detach().cpu().clone() for k, v in trunk_weights(method.backbone).items()}
    return weights, BackboneArch(str(method.arch), bool(method.small_images))


def backbone_from_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone weights of an objcrop checkpoint (see :func:`checkpoint_backbone`)."""
    return checkpoint_backbone(path)[0]


def arch_sidecar(path: str | os.PathLike) -> Path:
    """The JSON file next to a state dict that names its architecture: ``<path>.json``."""
    return Path(f"{os.fspath(path)}.json")


def write_arch_sidecar(path: str | os.PathLike, arch: str, small_images: bool, **extra) -> Path:
    """Writes ``<path>.json`` with the architecture of the state dict at ``path`` (atomically).

    ``written_by: objcrop`` in it is the proof that lets a later run replace it (see :func:`check_state_dict_out`).
    """
    sidecar = arch_sidecar(path)
    write_json_atomic(
        sidecar, {"arch": arch, "small_images": bool(small_images), **extra, "written_by": "objcrop"}, indent=2
    )
    return sidecar


# The marker of the state dicts objcrop saves (export, the supervised baseline). It sits in the dict's
# ``_metadata`` (the per-module table torch's ``state_dict()`` attaches and ``torch.save`` keeps), not among
# its keys: ``load_state_dict(strict=True)`` still sees exactly the network's tensors, and a module prefix is
# never ``__objcrop__``. State dicts objcrop wrote before the marker existed count as foreign.
STATE_DICT_MARK = "__objcrop__"


def mark_state_dict(weights: Mapping[str, torch.Tensor]) -> OrderedDict:
    """``weights`` (on the CPU, detached) as the state dict objcrop saves, with its marker."""
    state = OrderedDict((k, v.detach().cpu()) for k, v in weights.items())
    state._metadata = OrderedDict({STATE_DICT_MARK: {"written_by": "objcrop"}})  # type: ignore[attr-defined]
    return state


def state_dict_is_ours(path: Path) -> bool:
    """Whether ``path`` is a state dict saved by objcrop (:func:`mark_state_dict`); False for anything else."""
    try:  # mmap: the tensors' bytes are not read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises several types for foreign or truncated files
        return False
    metadata = getattr(state, "_metadata", None)
    return isinstance(metadata, Mapping) and metadata.get(STATE_DICT_MARK, {}).get("written_by") == "objcrop"


def check_state_dict_out(path: str | os.PathLike) -> Path:
    """``path`` when a state dict and its sidecar ``<path>.json`` may be written there: each absent or
    written by objcrop (see :func:`objcrop.io.check_replaceable`)."""
    check_replaceable(arch_sidecar(path), lambda p: json_is_ours(p, lambda obj: obj.get("written_by") == "objcrop"))
    return check_replaceable(path, state_dict_is_ours)


def read_arch_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of the state dict at ``path`` (``{"arch": ..., "small_images": ...}``), ``{}`` if none.

    Raises:
        ValueError: Naming the sidecar, when it cannot be read or is not a JSON object.
    """
    sidecar = arch_sidecar(path)
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{sidecar}: unreadable architecture sidecar: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar}: an architecture sidecar is a JSON object, got {type(meta).__name__}")
    return meta
