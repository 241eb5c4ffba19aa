"""Loads the backbone to evaluate: an objcrop checkpoint, a torchvision state dict, or a random init.

Three kinds of ``spec``:

* ``runs/x/checkpoints/ckpt-00001000.pt``: a checkpoint written by ``objcrop pretrain``; the
  architecture is the one its method declares (:func:`objcrop.ssl.backbone_io.checkpoint_arch`);
* ``backbone.pth``: a torchvision-named state dict (``objcrop export``, ``objcrop supervised``, or a
  torchvision ResNet's own weights; ``fc.*`` is ignored), or for ``timm:<name>`` a timm-named one (any
  ``timm.create_model(name).state_dict()``; the classifier head is ignored). The architecture is read from
  the sidecar ``backbone.pth.json`` (``{"arch": ..., "small_images": ...}``) when there is one, else it
  must be given;
* ``random:resnet18`` or ``random:timm:<name>``: the architecture with seeded random weights, the
  "no pretraining" row.

Every file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from objcrop.io import load_error_reason
from objcrop.ssl.backbone_io import backbone_from_checkpoint, checkpoint_arch, is_objcrop_checkpoint, read_arch_sidecar
from objcrop.ssl.backbones import build_backbone, load_trunk_weights
from objcrop.ssl.errors import CheckpointError

__all__ = ["BackboneInfo", "RANDOM_PREFIX", "backbone_info", "load_backbone"]

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class BackboneInfo:
    """What a spec resolves to, and what identifies its weights (for feature caches).

    Attributes:
        spec: The spec as given.
        kind: ``"checkpoint"``, ``"state_dict"`` or ``"random"``.
        arch: Backbone name (see :data:`objcrop.ssl.backbones.BACKBONES`, or ``timm:<name>``).
        small_images: Whether the trunk has the small-image stem.
        path: Absolute path of the weights file (empty for ``random``).
        mtime_ns: Modification time of the file (0 for ``random``).
        size: Size in bytes of the file (0 for ``random``).
        seed: Seed of the random weights (0 for files).
    """

    spec: str
    kind: str
    arch: str
    small_images: bool
    path: str = ""
    mtime_ns: int = 0
    size: int = 0
    seed: int = 0

    def fingerprint(self) -> dict:
        """A JSON-able identity of the weights: the file's path, mtime and size, or the random seed."""
        out = asdict(self)
        out.pop("spec")
        return out


def _load_file(path: Path, mmap: bool = False) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for foreign or truncated files
        raise ValueError(f"cannot load weights from {path}: {load_error_reason(err)}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or an objcrop checkpoint, got {type(state).__name__}")
    return state


def backbone_info(
    spec: str | os.PathLike, arch: str | None = None, small_images: bool | None = None, seed: int = 0
) -> BackboneInfo:
    """Resolves ``spec`` to its architecture and identity without building the network.

    Args:
        spec: Checkpoint, state dict file, or ``random:<arch>``.
        arch: Architecture of a plain state dict (overrides its sidecar); must agree with a checkpoint's.
        small_images: Small-image stem, for a plain state dict or ``random:``; ``None`` reads the sidecar
            (or means ``False``).
        seed: Seed of ``random:`` weights.

    Raises:
        FileNotFoundError: The weights file does not exist.
        ValueError: Unreadable file, or the architecture is unknown or contradicts the checkpoint.
    """
    spec = os.fspath(spec)
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX) :]
        if arch is not None and arch != name:
            raise ValueError(f"{spec}: --arch {arch} contradicts the architecture in the spec")
        return BackboneInfo(spec, "random", name, bool(small_images), seed=seed)
    path = Path(spec).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {spec}")
    stat = path.stat()
    state = _load_file(path, mmap=True)  # only the config is needed here; mmap reads no tensor data
    if is_objcrop_checkpoint(state):
        ckpt_arch, ckpt_small = checkpoint_arch(state, path)
        if (arch is not None and arch != ckpt_arch) or (small_images is not None and small_images != ckpt_small):
            raise ValueError(
                f"{path}: the checkpoint holds a {ckpt_arch} (small_images={ckpt_small}); "
                "do not pass another --arch / --small-images"
            )
        return BackboneInfo(spec, "checkpoint", ckpt_arch, ckpt_small, str(path), stat.st_mtime_ns, stat.st_size)
    meta = read_arch_sidecar(path)
    arch = arch or meta.get("arch")
    if arch is None:
        raise ValueError(f"{path}: a plain state dict needs --arch (and --small-images if it has that stem)")
    small = bool(meta.get("small_images", False)) if small_images is None else small_images
    return BackboneInfo(spec, "state_dict", arch, small, str(path), stat.st_mtime_ns, stat.st_size)


def _trunk_weights(info: BackboneInfo) -> dict[str, torch.Tensor]:
    if info.kind == "checkpoint":
        try:
            return backbone_from_checkpoint(info.path)
        except CheckpointError as err:
            raise ValueError(str(err)) from err
    state = _load_file(Path(info.path))
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_backbone(
    spec: str | os.PathLike, arch: str | None = None, small_images: bool | None = None, seed: int = 0
) -> tuple[nn.Module, int]:
    """Builds the backbone ``spec`` describes, in eval mode, mapping images ``[B, 3, H, W]`` to ``[B, D]``.

    Args:
        spec: Checkpoint, state dict file, or ``random:<arch>`` (see the module docstring).
        arch: Architecture of a plain state dict without sidecar.
        small_images: Small-image stem of a plain state dict or a random init.
        seed: Seed of ``random:`` weights (the same seed gives the same weights).

    Returns:
        The network and its feature dimension ``D``. :func:`backbone_info` tells what ``spec`` resolved to.

    Raises:
        FileNotFoundError: The weights file does not exist.
        ValueError: Unreadable file, unknown architecture, or weights that do not fit the architecture.
    """
    info = backbone_info(spec, arch, small_images, seed)
    if info.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, dim = build_backbone(info.arch, small_images=info.small_images)
        return net.eval(), dim
    net, dim = build_backbone(info.arch, small_images=info.small_images)
    try:
        load_trunk_weights(net, _trunk_weights(info), f"{info.path}: weights")  # the classifier is ignored
    except ValueError as err:
        raise ValueError(f"{err}; check --arch ({info.arch}) / --small-images ({info.small_images})") from err
    return net.eval(), dim
