"""Exports a pretrained backbone: a torchvision ``state_dict`` or a Detectron2 ``.pkl``.

The Detectron2 file follows the layout of MoCo's converter (``res2``..``res5`` stages, ``stem``,
``shortcut`` and ``*.norm`` names, ``matching_heuristics``), so the paper's transfer protocol
(R50-C4 on VOC, Mask R-CNN FPN on COCO) runs on it unchanged.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from objcrop.ssl.checkpoint import atomic_torch_save, load_checkpoint

__all__ = ["backbone_from_checkpoint", "to_detectron2_names", "export_torchvision", "export_detectron2"]


def backbone_from_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone weights of an objcrop checkpoint, with torchvision ResNet names (no ``fc``)."""
    from objcrop.ssl.trainer import build_method

    state = load_checkpoint(path)
    config = json.loads(state["config"])
    method = build_method(config)
    method.load_state_dict(state["model"])
    return {k: v.detach().cpu().clone() for k, v in method.backbone.state_dict().items()}


def to_detectron2_names(name: str) -> str:
    """Maps a torchvision ResNet parameter name to Detectron2's."""
    if not name.startswith("layer"):
        name = "stem." + name
    name = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return name


def export_torchvision(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the backbone as a torchvision ``state_dict`` (load with ``strict=False``: no ``fc``)."""
    weights = backbone_from_checkpoint(checkpoint)
    atomic_torch_save(weights, out)
    return Path(out)


def export_detectron2(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the backbone as a Detectron2 ``.pkl`` (numpy arrays under ``model``)."""
    weights = backbone_from_checkpoint(checkpoint)
    converted = {
        to_detectron2_names(k): v.numpy() for k, v in weights.items() if not k.endswith("num_batches_tracked")
    }
    payload = {"model": converted, "__author__": "objcrop", "matching_heuristics": True}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(payload, f)  # Detectron2 reads this format; objcrop itself never loads pickles
    os.replace(tmp, out)
    return out
