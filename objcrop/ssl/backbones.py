"""Backbones for the SSL methods: torchvision ResNet trunks, or any timm model (``timm:<name>``).

A torchvision trunk keeps torchvision's child names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so its
``state_dict`` loads into a torchvision ResNet (``strict=False``, no ``fc``) for linear evaluation and
detection transfer.

A ``timm:<name>`` backbone is ``timm.create_model(name, pretrained=False, num_classes=0)`` inside a
:class:`TimmTrunk`; :func:`trunk_weights` gives its weights under timm's own names, which load into
``timm.create_model(name, pretrained=False)`` (all but the classifier head). Vision transformers are built
with ``dynamic_img_size=True``: their positional embedding keeps the model's default grid (14 x 14 for a
224 px ViT-B/16) and is resampled to the grid of each input, so any view size divisible by the patch size
works and the weights keep the shapes timm expects.

Weights are always random: nothing is downloaded.
"""

from __future__ import annotations

import difflib
import logging
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

__all__ = [
    "BACKBONES",
    "TIMM_PREFIX",
    "TimmTrunk",
    "build_backbone",
    "check_view_size",
    "convert_sync_batchnorm",
    "is_timm",
    "load_trunk_weights",
    "timm_model_name",
    "trunk_weights",
]

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
TIMM_PREFIX = "timm:"

logger = logging.getLogger(__name__)

_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def is_timm(name: str) -> bool:
    """Whether a backbone name asks for a timm model (``timm:<name>``)."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def timm_model_name(name: str) -> str:
    """The timm model name of ``timm:<name>``, checked against ``timm.list_models()``.

    Raises:
        ValueError: For a name timm does not know, with the closest known names.
    """
    import timm

    model = name[len(TIMM_PREFIX) :] if is_timm(name) else name
    known = timm.list_models()
    if model.split(".")[0] not in known:  # "name.tag" selects one of the model's configs
        close = difflib.get_close_matches(model, known, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
        raise ValueError(f"unknown timm model {model!r} (backbone {name!r}){hint}")
    return model


def _create_timm_model(model: str) -> nn.Module:
    import timm

    try:  # transformers: accept any input size divisible by the patch size (resampled positional embedding)
        return timm.create_model(model, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError as err:  # models without the option (CNNs) refuse the keyword before building anything
        if "dynamic_img_size" not in str(err):
            raise
    return timm.create_model(model, pretrained=False, num_classes=0)


def _head_only_parameters(model: nn.Module, model_name: str, side: int) -> list[str]:
    """Names of the parameters that ``forward_features`` leaves out (ConvNeXt's ``head.norm``, a pooled ViT's
    ``fc_norm``), found by one forward and backward pass on the meta device (no memory, no compute)."""
    if next(model.parameters()).is_meta:
        probe = model
    else:
        with torch.device("meta"):
            probe = _create_timm_model(model_name)
    try:
        probe.forward_features(torch.empty(1, 3, side, side, device="meta")).float().sum().backward()
    except Exception as err:  # an op without a meta kernel: keep every parameter trainable
        logger.debug("no meta probe of %s: %s", model_name, err)
        return []
    finally:
        unused = [name for name, p in probe.named_parameters() if p.grad is None]
        probe.zero_grad(set_to_none=True)
    return unused


class TimmTrunk(nn.Module):
    """A timm model without its classifier: pooled features ``[B, D]`` or a dense map ``[B, D, h, w]``.

    The dense map is the last feature map of a CNN (``forward_features``; NHWC models are permuted), or
    the patch tokens of a transformer with the class/register tokens (``num_prefix_tokens``) dropped,
    laid out on the patch grid. Parameters that only the pooled output uses (ConvNeXt's ``head.norm``, a
    pooled ViT's ``fc_norm``) get no gradient from the dense map, which DDP refuses: in dense mode they are
    frozen at their initial values (a LayerNorm's ones and zeros) and stay in the state dict.

    Args:
        name: ``timm:<name>`` (or the bare timm name).
        feature_map: Return the dense map instead of the pooled features.

    Raises:
        ValueError: Unknown model name.
    """

    def __init__(self, name: str, feature_map: bool = False) -> None:
        super().__init__()
        self.timm_name = timm_model_name(name)
        self.model = _create_timm_model(self.timm_name)
        self.feature_map = feature_map
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        self.patch_size: tuple[int, int] | None = None if patch is None else tuple(int(p) for p in patch)
        if feature_map:
            side = 4 * max(self.patch_size) if self.patch_size else 64
            for name in _head_only_parameters(self.model, self.timm_name, side):
                self.model.get_parameter(name).requires_grad_(False)

    @property
    def arch(self) -> str:
        """The backbone name that rebuilds this trunk: ``timm:<name>``."""
        return TIMM_PREFIX + self.timm_name

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    def _check_size(self, x: torch.Tensor) -> None:
        if self.patch_size is None:
            return
        height, width = x.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(
                f"{self.arch} needs inputs whose sides are multiples of its patch size {self.patch_size}, "
                f"got {height} x {width}; set crops.size (and the evaluation sizes) to a multiple"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        if not self.feature_map:
            return self.model(x)
        features = self.model.forward_features(x)
        if features.ndim == 3 and self.patch_size is not None:  # tokens [B, prefix + h * w, D]
            tokens = features[:, int(getattr(self.model, "num_prefix_tokens", 0)) :]
            grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
            if tokens.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"{self.arch}: {tokens.shape[1]} patch tokens do not fill a {grid} grid")
            return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[2], *grid)
        if features.ndim != 4:
            raise ValueError(f"{self.arch}: forward_features gives {features.ndim}-d output, not a feature map")
        if str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC"):
            features = features.permute(0, 3, 1, 2)
        return features


def build_backbone(
    name: str = "resnet50", small_images: bool = False, feature_map: bool = False
) -> tuple[nn.Module, int]:
    """Builds a randomly initialised backbone without its classifier.

    Args:
        name: One of :data:`BACKBONES`, or ``timm:<name>`` for any model of ``timm.list_models()``
            (e.g. ``timm:resnet50``, ``timm:vit_small_patch16_224``, ``timm:convnext_tiny``).
        small_images: For torchvision ResNets, replace the stem by a 3x3 stride-1 convolution and drop
            the max-pool, the usual CIFAR/STL stem for 32-96 px inputs (total stride 8 instead of 32).
            timm models keep their own stem, so it must be false for them.
        feature_map: Return a dense map ``[B, D, h, w]`` (for DenseCL) instead of the pooled vector
            ``[B, D]``: the C5 map of a ResNet, the last map of a timm CNN, the patch grid of a ViT.

    Returns:
        The trunk and its feature dimension ``D`` (512 for ResNet-18/34, 2048 for ResNet-50 and up).

    Raises:
        ValueError: For an unknown name (timm names come with close matches), or ``small_images``
            with a timm model.
    """
    if is_timm(name):
        if small_images:
            raise ValueError(
                f"small_images (the CIFAR stem) is for torchvision ResNets; {name} keeps timm's stem: set it "
                "false (ViTs take any view size divisible by their patch size)"
            )
        trunk = TimmTrunk(name, feature_map=feature_map)
        return trunk, trunk.feature_dim
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm:<name>")
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


def check_view_size(name: str, size: int) -> None:
    """Checks, before training, that ``size x size`` views fit the backbone (ViT patch sizes).

    Raises:
        ValueError: The backbone cuts its input into patches that do not tile ``size``.
    """
    if not is_timm(name):
        return
    with torch.device("meta"):  # structure only
        trunk = TimmTrunk(name)
    trunk._check_size(torch.empty(1, 3, size, size, device="meta"))


def trunk_weights(trunk: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a trunk under the names its own library uses: torchvision's, or timm's."""
    module = trunk.model if isinstance(trunk, TimmTrunk) else trunk
    return module.state_dict()


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def load_trunk_weights(trunk: nn.Module, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Loads weights named as :func:`trunk_weights` gives them, ignoring a classifier (``fc``, timm's head).

    Every other tensor must be present and fit.

    Raises:
        ValueError: Missing, unexpected or mis-shaped tensors, naming ``source``.
    """
    module = trunk.model if isinstance(trunk, TimmTrunk) else trunk
    prefixes = _classifier_prefixes(module) if isinstance(trunk, TimmTrunk) else ("fc.",)
    kept = {k: v for k, v in weights.items() if not k.startswith(prefixes)}
    try:
        module.load_state_dict(kept, strict=True)
    except RuntimeError as err:
        arch = trunk.arch if isinstance(trunk, TimmTrunk) else "this torchvision ResNet"
        raise ValueError(f"{source} do not fit {arch}: {' '.join(str(err).split())[:400]}") from err


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm layer by ``nn.SyncBatchNorm`` (statistics over all ranks).

    Outside ``torch.distributed`` (or with one rank) SyncBatchNorm behaves like BatchNorm.
    Convert before building the EMA copy, so both encoders share the same layer types. timm's fused
    norm + activation layers (``BatchNormAct2d``) become timm's ``SyncBatchNormAct``, keeping the activation.
    """
    if any(isinstance(m, TimmTrunk) for m in module.modules()):
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
