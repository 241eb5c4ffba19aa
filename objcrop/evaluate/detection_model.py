"""A torchvision Faster R-CNN with FPN on a pretrained (or random) objcrop ResNet backbone.

Nothing is downloaded: the ResNet is built with ``weights=None`` and takes its weights from an
objcrop checkpoint or an exported torchvision ``state_dict``.

Normalization of the backbone (``norm``):

- ``"frozen"`` (torchvision's default): every BatchNorm of the ResNet becomes ``FrozenBatchNorm2d``,
  fixed at the pretrained statistics and affine parameters; the FPN and the box head have no norm.
- ``"bn"`` (the Detectron2 protocol of MoCo, DenseCL and the paper): the ResNet keeps trainable
  BatchNorm in the trained stages, and the FPN and a 4conv1fc box head get BatchNorm as well. The
  protocol uses SyncBN over 8 GPUs (16 images per normalization); in one process this is plain
  BatchNorm over the batch, which is noisy with a few images per batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from objcrop.ssl.backbones import BACKBONES

__all__ = ["NORMS", "backbone_weights", "build_detector", "freeze_batchnorm", "load_backbone_weights"]

NORMS = ("frozen", "bn")

# Trained stages for trainable_layers = k are the first k of these (torchvision's convention).
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
_FPN_CHANNELS = 256


def backbone_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """Reads backbone weights from an objcrop checkpoint or a torchvision ResNet ``state_dict``.

    Args:
        path: A ``ckpt-*.pt`` written by ``objcrop pretrain``, or a ``.pth`` written by
            ``objcrop export --to torchvision`` (any torchvision ResNet ``state_dict``; ``fc`` is ignored).

    Returns:
        The weights with torchvision ResNet names, and the architecture recorded in a checkpoint
        (``None`` for a plain ``state_dict``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: The file is neither, or the checkpoint was pretrained with the small-image stem.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "backbone weights not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot read weights: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict or an objcrop checkpoint, got {type(state).__name__}")
    if "model" in state and "step" in state and "config" in state:
        from objcrop.ssl.export import backbone_from_checkpoint

        method = json.loads(state["config"])["method"]
        if method.get("small_images"):
            raise ValueError(
                f"{path}: pretrained with the small-image stem (3x3, no max-pool); detection needs the "
                "standard ResNet stem"
            )
        return backbone_from_checkpoint(path), method.get("backbone")
    if not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a state_dict of tensors")
    return state, None


def load_backbone_weights(resnet: nn.Module, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Loads ResNet weights into ``resnet``; every trunk tensor must be present (``fc`` and BatchNorm's
    ``num_batches_tracked`` may be missing).

    Raises:
        ValueError: Missing, unexpected or mis-shaped tensors (another architecture), naming ``source``.
    """
    try:
        missing, unexpected = resnet.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{source} do not fit this ResNet (another architecture?): {err}") from err
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{source} do not fit this ResNet (another architecture?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every ``BatchNorm2d`` in ``module`` by a ``FrozenBatchNorm2d`` with its statistics and affine."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _freeze_stages(resnet: nn.Module, trainable_layers: int, norm: str) -> None:
    trained = list(_STAGES[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    for name, child in resnet.named_children():
        if name in trained:
            continue
        child.requires_grad_(False)
        if norm == "bn":  # like Detectron2's FREEZE_AT: frozen stages keep their statistics too
            setattr(resnet, name, freeze_batchnorm(child))


def build_detector(
    arch: str,
    num_classes: int,
    weights: dict[str, torch.Tensor] | None = None,
    trainable_layers: int = 3,
    norm: str = "frozen",
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    proposals_train: int = 2000,
    proposals_test: int = 1000,
    rois_per_image: int = 512,
    weights_source: str = "weights",
) -> FasterRCNN:
    """Builds Faster R-CNN + FPN (P2-P6, 256 channels) on a torchvision ResNet.

    Args:
        arch: One of :data:`objcrop.ssl.backbones.BACKBONES`.
        num_classes: Object classes, without the background (the model predicts labels ``1..num_classes``).
        weights: ResNet weights with torchvision names (see :func:`backbone_weights`); ``None`` keeps the
            random initialisation (the baseline).
        trainable_layers: ResNet stages trained, counted from ``layer4`` (0 to 5; 5 trains everything).
        norm: One of :data:`NORMS` (see the module docstring).
        min_size: Shorter image side; several values pick one at random per training batch (the last
            one is used for testing).
        max_size: Longest image side.
        proposals_train: RPN proposals kept per image in training (after NMS), torchvision's default.
        proposals_test: RPN proposals kept per image in testing.
        rois_per_image: Proposals sampled per image to train the box head. Fewer proposals and RoIs
            make small CPU runs much faster: the box head's cost grows with them, not with the image size.
        weights_source: What ``weights`` came from, for error messages.

    Raises:
        ValueError: Unknown ``arch`` or ``norm``, ``trainable_layers`` outside 0..5, weights that do
            not fit ``arch``.
    """
    if arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    resnet = torchvision.models.get_model(
        arch, weights=None, norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    )
    if weights is not None:
        load_backbone_weights(resnet, weights, weights_source)
    _freeze_stages(resnet, trainable_layers, norm)

    layer_norm = nn.BatchNorm2d if norm == "bn" else None
    c2 = resnet.inplanes // 8  # channels of layer1's output (256 for ResNet-50, 64 for ResNet-18)
    backbone = BackboneWithFPN(
        resnet,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[c2 * 2**k for k in range(4)],
        out_channels=_FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=layer_norm,
    )
    heads: dict[str, nn.Module] = {}
    if norm == "bn":  # Detectron2's FastRCNNConvFCHead (4 conv + 1 fc) with norm, as in MoCo's FPN configs
        heads["box_head"] = FastRCNNConvFCHead((_FPN_CHANNELS, 7, 7), [256] * 4, [1024], norm_layer=layer_norm)
        heads["box_predictor"] = FastRCNNPredictor(1024, num_classes + 1)
    min_sizes = (min_size,) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    return FasterRCNN(
        backbone,
        num_classes=None if heads else num_classes + 1,
        min_size=min_sizes,
        max_size=max_size,
        rpn_pre_nms_top_n_train=proposals_train,
        rpn_post_nms_top_n_train=proposals_train,
        rpn_pre_nms_top_n_test=proposals_test,
        rpn_post_nms_top_n_test=proposals_test,
        box_batch_size_per_image=rois_per_image,
        **heads,
    )
