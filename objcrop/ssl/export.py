"""Exports a pretrained backbone: a torchvision (or timm) ``state_dict``, or a Detectron2 ``.pkl``.

A ``timm:<name>`` backbone exports under timm's own names: the file loads into
``timm.create_model(name, pretrained=False)`` with only the classifier head missing.

The Detectron2 file follows the layout of MoCo's converter (``res2``..``res5`` stages, ``stem``,
``shortcut`` and ``*.norm`` names, ``matching_heuristics``), so the paper's transfer protocol
(R50-C4 on VOC, Mask R-CNN FPN on COCO) runs on it unchanged. It exists for torchvision ResNets only.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
from pathlib import Path

import torch

from objcrop.io import atomic_open
from objcrop.ssl.backbones import is_timm, trunk_weights
from objcrop.ssl.checkpoint import atomic_torch_save, load_checkpoint

__all__ = ["backbone_from_checkpoint", "to_detectron2_names", "export_torchvision", "export_detectron2"]


def _backbone_and_method(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from objcrop.ssl.trainer import build_method

    state = load_checkpoint(path)
    config = json.loads(state["config"])
    with torch.device("meta"):  # structure only: the weights come from the checkpoint
        method = build_method(config)
    method.load_state_dict(state["model"], assign=True)
    weights = {k: v.detach().cpu().clone() for k, v in trunk_weights(method.backbone).items()}
    return weights, config["method"]


def backbone_from_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone weights of an objcrop checkpoint, with torchvision ResNet names (no ``fc``) or, for a
    ``timm:<name>`` backbone, timm's names (no classifier head)."""
    return _backbone_and_method(path)[0]


def to_detectron2_names(name: str) -> str:
    """Maps a torchvision ResNet parameter name to Detectron2's, as MoCo's ``convert-pretrain-to-detectron2.py``."""
    if not name.startswith("layer"):
        name = "stem." + name
    name = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return name


def export_torchvision(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the backbone as a torchvision ``state_dict`` (load with ``strict=False``: no ``fc``), plus
    the ``<out>.json`` sidecar naming its architecture for ``objcrop linear/knn/detect``.

    A ``timm:<name>`` backbone is written under timm's names instead (``arch`` ``timm:<name>`` in the
    sidecar): ``timm.create_model(name, pretrained=False).load_state_dict(w, strict=False)`` misses only
    the classifier head.
    """
    from objcrop.evaluate.backbone import write_arch_sidecar

    weights, method = _backbone_and_method(checkpoint)
    atomic_torch_save(weights, out)
    write_arch_sidecar(out, _arch(method), bool(method.get("small_images", False)), source=str(checkpoint))
    return Path(out)


def export_detectron2(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the backbone as a Detectron2 ``.pkl`` (numpy arrays under ``model``).

    Raises:
        ValueError: For a small-image stem (3x3 convolution, no max-pool), which Detectron2's ResNet
            stem cannot hold: it would skip the mismatched weights with only a warning; or for a timm
            backbone, whose names have no Detectron2 mapping.
    """
    weights, method = _backbone_and_method(checkpoint)
    if is_timm(_arch(method)):
        raise ValueError(
            f"{checkpoint}: {_arch(method)} has no Detectron2 layout; export it with --to torchvision "
            "(a timm state_dict)"
        )
    if method.get("small_images", False):
        raise ValueError(f"{checkpoint}: a small-image stem has no Detectron2 equivalent; export it for torchvision")
    converted = {to_detectron2_names(k): v.numpy() for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    payload = {"model": converted, "__author__": "objcrop", "matching_heuristics": True}
    with atomic_open(out, "wb") as f:
        pickle.dump(payload, f)  # Detectron2 reads this format; objcrop itself never loads pickles
    return Path(out)


def _arch(method: dict) -> str:
    from objcrop.ssl.config import method_class

    default = inspect.signature(method_class(method["name"]).__init__).parameters["backbone"].default
    return str(method.get("backbone", default))
