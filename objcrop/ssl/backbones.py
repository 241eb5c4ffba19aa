"""ResNet trunks from torchvision, without the classifier, for the SSL methods.

The trunk keeps torchvision's child names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so its
``state_dict`` loads into a torchvision ResNet (``strict=False``, no ``fc``) for linear evaluation and
detection transfer. Weights are always random: nothing is downloaded.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn
import torchvision

__all__ = ["BACKBONES", "build_backbone", "convert_sync_batchnorm"]

BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def build_backbone(
    name: str = "resnet50", small_images: bool = False, feature_map: bool = False
) -> tuple[nn.Sequential, int]:
    """Builds a randomly initialised torchvision ResNet without its ``fc`` layer.

    Args:
        name: One of :data:`BACKBONES`.
        small_images: Replace the stem by a 3x3 stride-1 convolution and drop the max-pool, the
            usual CIFAR/STL stem for 32-96 px inputs (total stride 8 instead of 32).
        feature_map: Return the C5 map ``[B, D, h, w]`` (for DenseCL) instead of the globally
            average-pooled vector ``[B, D]``.

    Returns:
        The trunk and its feature dimension ``D`` (512 for ResNet-18/34, 2048 for ResNet-50 and up).

    Raises:
        ValueError: For a name outside :data:`BACKBONES`.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    resnet = torchvision.models.get_model(name, weights=None)
    if small_images:
        resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
        resnet.maxpool = nn.Identity()
    layers = OrderedDict((child, getattr(resnet, child)) for child in _TRUNK)
    if not feature_map:
        layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
    return nn.Sequential(layers), resnet.fc.in_features


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm layer by ``nn.SyncBatchNorm`` (statistics over all ranks).

    Outside ``torch.distributed`` (or with one rank) SyncBatchNorm behaves like BatchNorm.
    Convert before building the EMA copy, so both encoders share the same layer types.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
