"""A torchvision Faster R-CNN with FPN on a pretrained (or random) objcrop backbone.

Nothing is downloaded: the ResNet is built with ``weights=None`` and takes its weights from an
objcrop checkpoint or an exported torchvision ``state_dict``.

A ``timm:<name>`` CNN becomes the FPN's body through timm's feature extraction (``FeatureGetterNet``,
what ``timm.create_model(..., features_only=True, feature_cls="getter")`` builds) on its stride 4, 8, 16
and 32 maps, after its weights are loaded under timm's own names; torchvision's
``FeaturePyramidNetwork`` sits on top. Vision transformers have one stride-16 map and need a
ViTDet-style neck, which objcrop does not build: they are refused.

Normalization of the backbone (``norm``):

- ``"frozen"`` (torchvision's default): every BatchNorm of the ResNet becomes ``FrozenBatchNorm2d``,
  fixed at the pretrained statistics and affine parameters; the FPN and the box head have no norm.
- ``"bn"`` (the Detectron2 protocol of MoCo, DenseCL and the paper): the ResNet keeps trainable
  BatchNorm in the trained stages, and the FPN and a 4conv1fc box head get BatchNorm as well. The
  protocol uses SyncBN over 8 GPUs (16 images per normalization); in one process this is plain
  BatchNorm over the batch, which is noisy with a few images per batch.

A random backbone needs ``"bn"``: with ``"frozen"`` its layers are not normalized at all and the loss
diverges within a few dozen iterations (measured on easy 64 px scenes at lr 0.02 and 0.005).

Box head (``box_head``): ``"4conv1fc"`` (Detectron2's, with BatchNorm under ``"bn"``) or ``"2fc"``
(torchvision's ``TwoMLPHead``); ``"auto"`` picks the first with ``"bn"`` and the second with ``"frozen"``.
On a CPU the 4conv1fc head costs about 3x the whole rest of the detector at 64 px (its four 3x3 convs run on
every sampled RoI), so small CPU runs use ``"2fc"``.

Anchors (``anchor_sizes``): torchvision's defaults are 32, 64, 128, 256 and 512 px on P2-P6, 8x each
level's stride. What matters is the objects' size in the resized image, not the image's: objects of
32 px and more are matched best by the defaults, on the dense stride-4 and stride-8 maps. Smaller anchors
only help smaller objects. Measured on 64 px scenes of one 26-45 px square: with anchors of 8-128 px,
AP50 after 40 iterations was 0.15, because the 32 px anchors sat on the stride-16 map. With the
defaults it was 1.0.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from objcrop.io import load_error_reason
from objcrop.ssl.backbone_io import (
    arch_sidecar,
    backbone_from_checkpoint,
    checkpoint_arch,
    is_objcrop_checkpoint,
    read_arch_sidecar,
)
from objcrop.ssl.backbones import BACKBONES, TimmTrunk, is_timm, load_trunk_weights

__all__ = [
    "BOX_HEADS",
    "NORMS",
    "backbone_weights",
    "build_detector",
    "check_detector_options",
    "freeze_batchnorm",
    "load_backbone_weights",
]

NORMS = ("frozen", "bn")
BOX_HEADS = ("auto", "2fc", "4conv1fc")
_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # torchvision's, per anchor size
_PYRAMID_LEVELS = 5  # P2-P5 and the max-pooled P6

# Trained stages for trainable_layers = k are the first k of these (torchvision's convention).
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
_FPN_CHANNELS = 256


def backbone_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """Reads backbone weights from an objcrop checkpoint or a torchvision ResNet ``state_dict``.

    Args:
        path: A ``ckpt-*.pt`` written by ``objcrop pretrain``, or a ``.pth`` written by
            ``objcrop export --to torchvision`` (any torchvision ResNet ``state_dict``; ``fc`` is ignored;
            or a timm ``state_dict`` whose ``<path>.json`` sidecar names ``timm:<name>``).

    Returns:
        The weights with torchvision ResNet (or timm) names, and the architecture recorded in a
        checkpoint or the file's sidecar (``None`` for a plain ``state_dict`` without one).

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
        raise ValueError(f"{path}: cannot read weights: {load_error_reason(err)}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict or an objcrop checkpoint, got {type(state).__name__}")
    if is_objcrop_checkpoint(state):
        arch, small_images = checkpoint_arch(state, path)
        if small_images:
            raise ValueError(
                f"{path}: pretrained with the small-image stem (3x3, no max-pool); detection needs the "
                "standard ResNet stem"
            )
        return backbone_from_checkpoint(path), arch
    if not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a state_dict of tensors")
    return state, _sidecar_arch(path)


def _sidecar_arch(path: str) -> str | None:
    meta = read_arch_sidecar(path)
    if meta.get("small_images"):
        raise ValueError(
            f"{path}: the small-image stem (3x3, no max-pool) does not fit detection (see {arch_sidecar(path)})"
        )
    return meta.get("arch")


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


def _resnet_fpn_backbone(
    arch: str,
    weights: dict | None,
    trainable_layers: int,
    norm: str,
    weights_source: str,
    fpn_channels: int = _FPN_CHANNELS,
) -> BackboneWithFPN:
    resnet = torchvision.models.get_model(
        arch, weights=None, norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    )
    if weights is not None:
        load_backbone_weights(resnet, weights, weights_source)
    _freeze_stages(resnet, trainable_layers, norm)
    c2 = resnet.inplanes // 8  # channels of layer1's output (256 for ResNet-50, 64 for ResNet-18)
    return BackboneWithFPN(
        resnet,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[c2 * 2**k for k in range(4)],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d if norm == "bn" else None,
    )


class TimmFPNBackbone(nn.Module):
    """A timm feature extractor (four maps, strides 4 to 32) under torchvision's ``FeaturePyramidNetwork``.

    Outputs maps ``"0"`` to ``"3"`` and ``"pool"`` with :attr:`out_channels` channels, like torchvision's
    ``BackboneWithFPN``, so ``FasterRCNN``'s default anchors and RoI pooling apply unchanged.
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels: Sequence[int],
        norm_layer: type[nn.Module] | None,
        out_channels: int = _FPN_CHANNELS,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _stages_of_modules(model: nn.Module, levels: Sequence[str]) -> dict[str, int]:
    """Stage of every module: 0 for the stem, k for the k-th pyramid level's module and what runs after it
    up to the next level (modules are registered in the order they run)."""
    stages, current = {}, 0
    for name, _ in model.named_modules():
        level = next((k for k, m in enumerate(levels, 1) if name == m or name.startswith(m + ".")), None)
        if level is not None:
            current = level
            stages[name] = level
        else:
            stages[name] = min(current + 1, len(levels)) if current else 0
    return stages


def _freeze_timm_stages(model: nn.Module, levels: Sequence[str], trainable_layers: int, norm: str) -> nn.Module:
    from timm.layers import freeze_batch_norm_2d

    if norm == "frozen":  # every BatchNorm (timm's fused BatchNormAct2d keeps its activation)
        model = freeze_batch_norm_2d(model)
    stages = _stages_of_modules(model, levels)
    first_trained = len(levels) + 1 - trainable_layers
    for name, param in model.named_parameters():  # by owning module: containers may span stages
        if stages[name.rpartition(".")[0]] < first_trained:
            param.requires_grad_(False)
    if norm == "bn":  # like Detectron2's FREEZE_AT: frozen stages keep their statistics too
        for name, module in list(model.named_modules()):
            if name and stages[name] < first_trained and isinstance(module, nn.modules.batchnorm._BatchNorm):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, freeze_batch_norm_2d(module))
    return model


def timm_fpn_backbone(
    arch: str,
    weights: dict[str, torch.Tensor] | None = None,
    trainable_layers: int = 3,
    norm: str = "frozen",
    weights_source: str = "weights",
    fpn_channels: int = _FPN_CHANNELS,
) -> TimmFPNBackbone:
    """The FPN backbone of a ``timm:<name>`` CNN: its stride 4, 8, 16, 32 maps into an FPN (256 channels).

    Raises:
        ValueError: A vision transformer (named, with what it would need), a model without those four
            strides, or weights that do not fit.
    """
    from timm.models._features import FeatureGetterNet

    trunk = TimmTrunk(arch)
    if trunk.patch_size is not None:
        raise ValueError(
            f"{arch} is a vision transformer: detection transfer needs a ViTDet-style neck (a feature pyramid "
            "built from its single stride-16 map), which is out of scope; use a CNN such as timm:resnet50"
        )
    if weights is not None:
        load_trunk_weights(trunk, weights, weights_source)
    info = list(trunk.model.feature_info)
    indices = [i for i, f in enumerate(info) if f["reduction"] >= 4][-4:]
    if [info[i]["reduction"] for i in indices] != [4, 8, 16, 32]:
        raise ValueError(f"{arch}: the FPN needs feature maps at strides 4, 8, 16, 32; timm lists {info}")
    levels = [info[i]["module"] for i in indices]
    model = _freeze_timm_stages(trunk.model, levels, trainable_layers, norm)
    body = FeatureGetterNet(model, out_indices=indices, prune=True)  # drops the head and the final norm
    return TimmFPNBackbone(body, body.feature_info.channels(), nn.BatchNorm2d if norm == "bn" else None, fpn_channels)


def check_detector_options(box_head: str, anchor_sizes: Sequence[float] | None, fpn_channels: int) -> None:
    """Raises ``ValueError`` naming the option when the box head, anchors or FPN width are invalid."""
    if box_head not in BOX_HEADS:
        raise ValueError(f"unknown box_head {box_head!r}; choose one of {', '.join(BOX_HEADS)}")
    if anchor_sizes is not None and (
        len(anchor_sizes) != _PYRAMID_LEVELS or not all(s > 0 and math.isfinite(s) for s in anchor_sizes)
    ):
        raise ValueError(f"anchor_sizes must be {_PYRAMID_LEVELS} positive sizes (P2-P6), got {list(anchor_sizes)}")
    if fpn_channels < 1:
        raise ValueError(f"fpn_channels must be positive, got {fpn_channels}")


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
    box_head: str = "auto",
    anchor_sizes: Sequence[int] | None = None,
    fpn_channels: int = _FPN_CHANNELS,
) -> FasterRCNN:
    """Builds Faster R-CNN + FPN (P2-P6, 256 channels by default) on a torchvision ResNet or a timm CNN.

    Args:
        arch: One of :data:`objcrop.ssl.backbones.BACKBONES`, or ``timm:<name>`` of a CNN with stride 4,
            8, 16 and 32 feature maps (ResNets, ConvNeXt, EfficientNet, ...).
        num_classes: Object classes, without the background (the model predicts labels ``1..num_classes``).
        weights: Backbone weights with torchvision (or timm) names (see :func:`backbone_weights`); ``None``
            keeps the random initialisation (the baseline).
        trainable_layers: Backbone stages trained, counted from the last (``layer4``; 0 to 5; 5 trains
            everything, the stem included).
        norm: One of :data:`NORMS` (see the module docstring).
        min_size: Shorter image side; several values pick one at random per training batch (the last
            one is used for testing).
        max_size: Longest image side.
        proposals_train: RPN proposals kept per image in training (after NMS), torchvision's default.
        proposals_test: RPN proposals kept per image in testing.
        rois_per_image: Proposals sampled per image to train the box head. Fewer proposals and RoIs
            make small CPU runs much faster: the box head's cost grows with them, not with the image size.
        weights_source: What ``weights`` came from, for error messages.
        box_head: One of :data:`BOX_HEADS` (see the module docstring).
        anchor_sizes: Anchor side in pixels (of the resized image) on each of the five pyramid levels
            P2-P6, three aspect ratios each; ``None`` keeps torchvision's 32 to 512.
        fpn_channels: Channels of the FPN maps (and so of the RPN head's conv and the box head's input).
            The FPN's and the RPN's 3x3 convs on P2 are most of a small detector's cost; 128 halves a
            CPU iteration at 128 px.

    Raises:
        ValueError: Unknown ``arch``, ``norm`` or ``box_head``, anchor sizes that are not five positive
            numbers, ``trainable_layers`` outside 0..5, weights that do not fit ``arch``, a timm vision
            transformer (no feature pyramid without a ViTDet neck).
    """
    if not is_timm(arch) and arch not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)} or timm:<name>")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    check_detector_options(box_head, anchor_sizes, fpn_channels)
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    layer_norm = nn.BatchNorm2d if norm == "bn" else None
    if is_timm(arch):
        backbone = timm_fpn_backbone(arch, weights, trainable_layers, norm, weights_source, fpn_channels)
    else:
        backbone = _resnet_fpn_backbone(arch, weights, trainable_layers, norm, weights_source, fpn_channels)
    heads: dict[str, nn.Module] = {}
    if box_head == "4conv1fc" or (box_head == "auto" and norm == "bn"):
        # Detectron2's FastRCNNConvFCHead (4 conv + 1 fc), with norm under "bn" as in MoCo's FPN configs
        heads["box_head"] = FastRCNNConvFCHead((fpn_channels, 7, 7), [256] * 4, [1024], norm_layer=layer_norm)
        heads["box_predictor"] = FastRCNNPredictor(1024, num_classes + 1)
    if anchor_sizes is not None:
        heads["rpn_anchor_generator"] = AnchorGenerator(
            tuple((float(s),) for s in anchor_sizes), (_ASPECT_RATIOS,) * _PYRAMID_LEVELS
        )
    min_sizes = (min_size,) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    return FasterRCNN(
        backbone,
        num_classes=None if "box_predictor" in heads else num_classes + 1,
        min_size=min_sizes,
        max_size=max_size,
        rpn_pre_nms_top_n_train=proposals_train,
        rpn_post_nms_top_n_train=proposals_train,
        rpn_pre_nms_top_n_test=proposals_test,
        rpn_post_nms_top_n_test=proposals_test,
        box_batch_size_per_image=rois_per_image,
        **heads,
    )
