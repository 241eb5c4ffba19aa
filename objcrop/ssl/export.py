"""Exports a pretrained backbone: a torchvision (or timm) ``state_dict``, or a Detectron2 ``.pkl``.

A ``timm:<name>`` backbone exports under timm's own names: the file loads into
``timm.create_model(name, pretrained=False)`` with only the classifier head missing.

The Detectron2 file follows the layout of MoCo's converter (``res2``..``res5`` stages, ``stem``,
``shortcut`` and ``*.norm`` names, ``matching_heuristics``), so the paper's transfer protocol
(R50-C4 on VOC, Mask R-CNN FPN on COCO) runs on it unchanged. It exists for torchvision ResNets only.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
from pathlib import Path

from objcrop.io import atomic_open, atomic_torch_save, check_replaceable
from objcrop.ssl.backbone_io import check_state_dict_out, checkpoint_backbone, mark_state_dict, write_arch_sidecar
from objcrop.ssl.backbones import is_timm

__all__ = ["to_detectron2_names", "export_torchvision", "export_detectron2", "detectron2_pickle_is_ours"]

AUTHOR = "objcrop"  # the ``__author__`` of the Detectron2 files objcrop writes


def detectron2_pickle_is_ours(path: Path) -> bool:
    """Whether ``path`` is a pickle whose ``__author__`` is objcrop. The opcodes are only scanned
    (:func:`pickletools.genops`), never executed: objcrop does not unpickle files it did not prove."""
    previous = None
    try:
        with open(path, "rb") as f:
            for _, arg, _ in pickletools.genops(f):
                if isinstance(arg, str):
                    if previous == "__author__":
                        return arg == AUTHOR
                    previous = arg
    except Exception:  # not a pickle, or a truncated one (pickletools raises several types)
        return False
    return False


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
    check_state_dict_out(out)  # before reading the checkpoint, and again before the writes
    weights, (arch, small_images) = checkpoint_backbone(checkpoint)
    check_state_dict_out(out)
    atomic_torch_save(mark_state_dict(weights), out)
    write_arch_sidecar(out, arch, small_images, source=str(checkpoint))
    return Path(out)


def export_detectron2(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the backbone as a Detectron2 ``.pkl`` (numpy arrays under ``model``).

    Raises:
        ValueError: For a small-image stem (3x3 convolution, no max-pool), which Detectron2's ResNet
            stem cannot hold: it would skip the mismatched weights with only a warning; or for a timm
            backbone, whose names have no Detectron2 mapping.
    """
    check_replaceable(out, detectron2_pickle_is_ours)
    weights, (arch, small_images) = checkpoint_backbone(checkpoint)
    if is_timm(arch):
        raise ValueError(
            f"{checkpoint}: {arch} has no Detectron2 layout; export it with --to torchvision (a timm state_dict)"
        )
    if small_images:
        raise ValueError(f"{checkpoint}: a small-image stem has no Detectron2 equivalent; export it for torchvision")
    converted = {to_detectron2_names(k): v.numpy() for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    # __author__ first: detectron2_pickle_is_ours finds it without scanning the weights
    payload = {"__author__": AUTHOR, "model": converted, "matching_heuristics": True}
    check_replaceable(out, detectron2_pickle_is_ours)
    with atomic_open(out, "wb") as f:
        pickle.dump(payload, f)  # Detectron2 reads this format; objcrop itself never loads pickles
    return Path(out)
