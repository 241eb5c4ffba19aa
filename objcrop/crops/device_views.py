"""Views made on the training device: crop, resize and augment a whole batch in a few batched ops.

A policy returns boxes, not pixels, so the loader only has to decode each image and draw its geometry
(:mod:`objcrop.crops.device_dataset`). :class:`DeviceViewMaker` turns what it ships, a padded batch of
``uint8`` images, the crop boxes ``[B, 2, 4]`` and per-view augmentation parameters ``[B, 2, P]``, into two
normalised ``[B, 3, S, S]`` channels_last view batches on whatever device the images are on. The same code
runs on CPU tensors, which is how the tests check it against the loader path.

Crop and resize: batched :func:`torchvision.ops.roi_align` calls for all ``2B`` views, antialiased (see
:func:`crop_resize`). Against the loader path (PIL's antialiased bilinear resize of the same float boxes) the
views reach a PSNR of at least 32.7 dB per view on COCO images, from 48 to 224 px (the tests require 30 dB).

Augmentations: small vectorised torch ops with explicit per-view parameters, plus ``kornia.color`` (HSV for
the hue shift) and ``kornia.filters.gaussian_blur2d`` (one sigma per view). ``kornia.augmentation`` was
measured instead (``benchmarks/bench_loader.py --compare-augment``: MoCo-v2 on 128 views of 96 px, one thread
of a shared 2-core AMD EPYC machine, two runs): 0.17-0.25 s per batch for kornia's ``AugmentationSequential``,
0.14-0.16 s here.
The larger reason is determinism, though: kornia draws its parameters from torch's global generator, per batch,
so a sample's augmentation would depend on the other samples of its batch. Here the parameters are drawn on the
loader side from the sample's own generator (:meth:`AugmentPreset.draw`), so they are a function of
``(seed, epoch, index)`` and exact resumption keeps working; the ops themselves draw nothing.

The parameter distributions follow :mod:`objcrop.crops.augment` (the loader's presets):

* MoCo-v2, both views: colour jitter (brightness, contrast, saturation 0.4, hue 0.1, in a random order)
  with p 0.8, grayscale p 0.2, Gaussian blur with sigma in [0.1, 2] with p 0.5, horizontal flip p 0.5;
* BYOL: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, flip; view 1 always blurred and never
  solarized, view 2 blurred with p 0.1 and solarized (threshold 0.5) with p 0.2;
* ``none``: crop and resize only, then normalisation.

Pixels are floats in ``[0, 1]`` throughout (the loader's PIL ops round to 8 bits after each step); each
jitter op clamps to ``[0, 1]`` as torchvision's tensor ops do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from objcrop.crops.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AUGMENT_PRESETS",
    "PARAM_NAMES",
    "AugmentPreset",
    "DeviceViewMaker",
    "ViewAugment",
    "augment_views",
    "crop_resize",
]

# One row of per-view parameters. Jitter factors are identities (1, 1, 1, 0) when the jitter is not applied;
# order0..3 are the positions of brightness (0), contrast (1), saturation (2) and hue (3); sigma 0 means no blur.
PARAM_NAMES = (
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "order0",
    "order1",
    "order2",
    "order3",
    "grayscale",
    "sigma",
    "flip",
    "solarize",
)
_P = {name: i for i, name in enumerate(PARAM_NAMES)}
_ORDER = slice(_P["order0"], _P["order3"] + 1)

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L").
_LUMA = (0.2989, 0.587, 0.114)


def _probability(label: str, p: float) -> float:
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"{label} must lie in [0, 1], got {p}")
    return float(p)


@dataclass(frozen=True)
class ViewAugment:
    """The augmentation parameters of one view, and how to draw them.

    Attributes:
        jitter: Colour jitter strengths (brightness, contrast, saturation, hue) as in ``v2.ColorJitter``:
            factors uniform in ``[max(0, 1 - s), 1 + s]``, the hue shift uniform in ``[-h, h]`` (h <= 0.5).
        jitter_p: Probability of the colour jitter.
        grayscale_p: Probability of grayscale (three equal channels).
        blur_sigma: Range of the Gaussian blur's sigma in pixels (uniform).
        blur_p: Probability of the blur.
        solarize_p: Probability of solarizing (pixels >= ``solarize_threshold`` become ``1 - x``).
        solarize_threshold: Fraction of the maximum pixel value.
        flip_p: Probability of a horizontal flip.
    """

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if len(self.jitter) != 4 or not all(math.isfinite(s) and s >= 0 for s in self.jitter):
            raise ValueError(f"jitter must be four finite strengths >= 0, got {self.jitter}")
        if self.jitter[3] > 0.5:
            raise ValueError(f"the hue strength must be <= 0.5, got {self.jitter[3]}")
        lo, hi = self.blur_sigma
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi):
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        for label in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold", "flip_p"):
            _probability(label, getattr(self, label))

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One float32 row of :data:`PARAM_NAMES`. Always draws the same amount from ``rng``."""
        u = rng.random(10).tolist()
        order = rng.permutation(4)
        row = np.zeros(len(PARAM_NAMES), dtype=np.float32)
        row[_ORDER] = np.arange(4)
        row[_P["brightness"] : _P["saturation"] + 1] = 1.0
        if u[0] < self.jitter_p:
            for k, (strength, draw) in enumerate(zip(self.jitter[:3], u[1:4], strict=True)):
                lo = max(0.0, 1.0 - strength)
                row[k] = lo + (1.0 + strength - lo) * draw
            row[_P["hue"]] = self.jitter[3] * (2.0 * u[4] - 1.0)
            row[_ORDER] = order
        row[_P["grayscale"]] = u[5] < self.grayscale_p
        if u[6] < self.blur_p:
            lo, hi = self.blur_sigma
            row[_P["sigma"]] = lo + (hi - lo) * u[7]
        row[_P["flip"]] = u[8] < self.flip_p
        row[_P["solarize"]] = u[9] < self.solarize_p
        return row


@dataclass(frozen=True)
class AugmentPreset:
    """The two views' augmentations (equal for symmetric methods) and the normalisation."""

    name: str
    views: tuple[ViewAugment, ViewAugment]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Float32 ``[2, P]`` parameters of one sample's two views."""
        return np.stack([view.draw(rng) for view in self.views])


_OFF = ViewAugment(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)
_BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)
AUGMENT_PRESETS: dict[str, AugmentPreset] = {
    "moco-v2": AugmentPreset("moco-v2", (ViewAugment(), ViewAugment())),
    "byol": AugmentPreset(
        "byol",
        (ViewAugment(jitter=_BYOL_JITTER, blur_p=1.0), ViewAugment(jitter=_BYOL_JITTER, blur_p=0.1, solarize_p=0.2)),
    ),
    "none": AugmentPreset("none", (_OFF, _OFF)),
}


# Views whose box is at least this many times the view size (on its shorter side) are cut at twice the view size
# and then halved with a tent filter; the others in one roi_align pass. See crop_resize.
_TENT_FROM_SCALE = 2.0
# A tent (PIL's bilinear filter) of half-width one output pixel, sampled where the double-size grid has its
# pixel centres (+-1/4 and +-3/4 of an output pixel): weights 3/4 and 1/4, normalised.
_TENT_TAPS = (0.125, 0.375, 0.375, 0.125)


def _tent_halve(x: torch.Tensor) -> torch.Tensor:
    """Halves ``[N, C, 2S, 2S]`` to ``[N, C, S, S]`` with the separable tent :data:`_TENT_TAPS` (edges repeated)."""
    c = x.shape[1]
    taps = torch.tensor(_TENT_TAPS, dtype=x.dtype, device=x.device)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, 4).expand(c, 1, 1, 4), stride=(1, 2), groups=c)
    return F.conv2d(x, taps.view(1, 1, 4, 1).expand(c, 1, 4, 1), stride=(2, 1), groups=c)


def crop_resize(images: torch.Tensor, crops: torch.Tensor, size: int) -> torch.Tensor:
    """Cuts every crop box out of its image, resized to ``size x size``, in batched ``roi_align`` calls.

    ``roi_align`` (``aligned=True``: box coordinates mean what they mean to PIL) with its adaptive sampling
    ratio averages ``ceil(box side / size)`` bilinear taps per output pixel and axis: a box filter, which
    is close to PIL's antialiased bilinear (tent) filter for mild downscaling, and leaves more aliasing than
    it from twice the view size on. Those views are therefore cut at ``2 * size`` and halved with a tent,
    which is close to PIL's filter there. Measured against the loader path (PIL, same float boxes) on 24 COCO
    images with crops of 2-100 % of the image: PSNR at least 32.7 dB (mean 47.2) at 224 px, 37.0 (43.4) at
    96 px and 37.3 (42.6) at 48 px; a box filter alone gave 32.1 dB at 96 px and 30.4 dB at 48 px.

    Args:
        images: ``[B, 3, H, W]`` batch (``uint8`` or float in ``[0, 255]``), each image at the top left of its
            slot. A slot larger than its image must repeat the image's last row and column once past its edge
            (as :func:`objcrop.crops.decode.pad_images` does): bilinear taps on the edge read that far.
        crops: ``[B, V, 4]`` xyxy boxes in pixels of each image, inside it (read on the CPU).
        size: Side of the views.

    Returns:
        Float32 ``[V * B, 3, size, size]`` views in ``[0, 1]``, view-major: view ``v`` of sample ``b`` is row
        ``v * B + b``.
    """
    b, v = crops.shape[0], crops.shape[1]
    if images.shape[0] != b:
        raise ValueError(f"{images.shape[0]} images but crop boxes for {b}")
    boxes = crops.detach().to("cpu", torch.float32).transpose(0, 1).reshape(-1, 4)
    boxes = torch.cat([torch.arange(b, dtype=torch.float32).repeat(v)[:, None], boxes], dim=1)
    shorter = torch.minimum(boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2])
    pixels = images.to(torch.float32)
    out = torch.empty((v * b, images.shape[1], size, size), dtype=torch.float32, device=images.device)
    for tent in (False, True):
        rows = torch.nonzero((shorter >= _TENT_FROM_SCALE * size) == tent).squeeze(1)
        if not rows.numel():
            continue
        # sampling_ratio <= 0: ceil(box side / output side) taps per output pixel and axis, per box.
        chosen = boxes[rows].to(images.device, non_blocking=True)
        cut = roi_align(pixels, chosen, output_size=2 * size if tent else size, sampling_ratio=-1, aligned=True)
        out[rows.to(images.device, non_blocking=True)] = _tent_halve(cut) if tent else cut
    return out.div_(255.0).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def _factor(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _factor(f)).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    f = _factor(f)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _factor(f)
    return (f * x + (1.0 - f) * _gray(x)).clamp_(0.0, 1.0)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, :1] + _factor(f) * (2.0 * math.pi), 2.0 * math.pi)
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1)).clamp_(0.0, 1.0)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def _where(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Row indices of a CPU mask, on ``device``; None when empty (the op is skipped: no device sync)."""
    idx = torch.nonzero(mask, as_tuple=False).squeeze(1)
    return idx.to(device, non_blocking=True) if idx.numel() else None


def augment_views(x: torch.Tensor, params: torch.Tensor, solarize_threshold: float = 0.5) -> torch.Tensor:
    """Applies per-view augmentations to float views in ``[0, 1]``, in place where it can.

    Order: colour jitter (each view's ops in its own order), grayscale, blur, solarize, flip. The flip
    commutes with the others (they are pointwise, or a symmetric blur), so BYOL's flip-first order gives
    the same views.

    Args:
        x: ``[N, 3, S, S]`` views.
        params: ``[N, P]`` rows of :data:`PARAM_NAMES` (on any device; decisions are read on the CPU, so the
            device never waits for a mask).
        solarize_threshold: Pixels at or above it are solarized.

    Returns:
        The augmented ``[N, 3, S, S]`` views.
    """
    cpu = params.detach().to("cpu", torch.float32)
    dev = params.to(x.device, torch.float32)
    device = x.device
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            active = (cpu[:, _ORDER][:, position] == op_index) & (cpu[:, op_index] != _IDENTITY[op_index])
            idx = _where(active, device)
            if idx is not None:
                x[idx] = op(x[idx], dev[idx, op_index])
    idx = _where(cpu[:, _P["grayscale"]] > 0, device)
    if idx is not None:
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    sigma = cpu[:, _P["sigma"]]
    idx = _where(sigma > 0, device)
    if idx is not None:
        from kornia.filters import gaussian_blur2d

        # One kernel for the batch, wide enough for three of its largest sigmas on each side (the loader's
        # tensor blur uses 2 * ceil(3 * sigma) + 1 per view; the extra taps of smaller sigmas weigh ~0).
        kernel = 2 * math.ceil(3.0 * float(sigma.max())) + 1
        s = dev[idx, _P["sigma"]]
        x[idx] = gaussian_blur2d(x[idx], (kernel, kernel), torch.stack([s, s], dim=1), border_type="reflect")
    idx = _where(cpu[:, _P["solarize"]] > 0, device)
    if idx is not None:
        sub = x[idx]
        x[idx] = torch.where(sub >= solarize_threshold, 1.0 - sub, sub)
    idx = _where(cpu[:, _P["flip"]] > 0, device)
    if idx is not None:
        x[idx] = x[idx].flip(-1)
    return x


class DeviceViewMaker:
    """Makes the two view batches of a device-path batch on the training device.

    Args:
        size: Side of the square views.
        augment: Name in :data:`AUGMENT_PRESETS` (``moco-v2``, ``byol``, ``none``) or a preset. It must be
            the preset whose parameters the loader drew; only its normalisation and solarize threshold are
            read here.
        channels_last: Return channels_last views (the trainer's default memory format).

    Returns (from ``__call__``):
        A list of two normalised float32 ``[B, 3, size, size]`` view batches on the images' device.
    """

    def __init__(self, size: int, augment: str | AugmentPreset = "moco-v2", channels_last: bool = True) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if isinstance(augment, str):
            if augment not in AUGMENT_PRESETS:
                raise ValueError(f"unknown augmentation preset {augment!r}; choose from {', '.join(AUGMENT_PRESETS)}")
            augment = AUGMENT_PRESETS[augment]
        self.size = int(size)
        self.preset = augment
        self.channels_last = bool(channels_last)
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"DeviceViewMaker(size={self.size}, augment={self.preset.name!r})"

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._norm:
            mean = torch.tensor(self.preset.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.preset.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._norm[device] = (mean, std)
        return self._norm[device]

    def __call__(
        self,
        images: torch.Tensor,
        crops: torch.Tensor,
        params: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> list[torch.Tensor]:
        """Two view batches of ``images`` (``[B, 3, H, W]`` uint8, padded), ``crops`` (``[B, 2, 4]``) and
        ``params`` (``[B, 2, P]``; None: no augmentation). ``normalize=False`` returns pixels in ``[0, 1]``."""
        if crops.ndim != 3 or crops.shape[1:] != (2, 4):
            raise ValueError(f"crops must be [B, 2, 4], got {list(crops.shape)}")
        b = crops.shape[0]
        # Made in fp32 whatever the caller's autocast: the blur's convolution would otherwise run in bf16.
        with torch.autocast(images.device.type, enabled=False):
            x = crop_resize(images, crops, self.size)
            if params is not None:
                if params.shape != (b, 2, len(PARAM_NAMES)):
                    raise ValueError(f"params must be [B, 2, {len(PARAM_NAMES)}], got {list(params.shape)}")
                flat = params.transpose(0, 1).reshape(2 * b, -1)  # view-major, as the views
                x = augment_views(x, flat, self.preset.views[1].solarize_threshold)
            if normalize:
                mean, std = self._mean_std(x.device)
                x = x.sub_(mean).div_(std)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [v.contiguous(memory_format=fmt) for v in x.split(b)]

    def from_batch(self, batch: dict, device: torch.device | str) -> list[torch.Tensor]:
        """The views of a collated device-path batch (:func:`objcrop.crops.device_dataset.collate_images`),
        after moving its images to ``device``."""
        images = batch["images"].to(device, non_blocking=True)
        return self(images, batch["crops"], batch.get("params"))
