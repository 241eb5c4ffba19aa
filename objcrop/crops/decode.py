"""Decoding for the device path: images as ``uint8`` ``[3, H, W]`` tensors, and padded batches of them.

JPEG files are decoded with libjpeg-turbo through ``torchvision.io.decode_jpeg`` or TorchCodec; everything
else (PNG, WebP, TIFF, tar shard members, and any JPEG a fast decoder refuses) through
:func:`objcrop.data.images.load_image`, so the device path sees the same upright RGB pixels as the loader
path and raises the same :class:`~objcrop.data.images.ImageReadError` naming the file.

Measured on the 128 COCO images of ``shared/data/coco128`` (one thread of a shared 2-core AMD EPYC machine,
``benchmarks/bench_loader.py --decoders``, three runs): PIL's ``load_image`` 3.7-3.8 ms per image (4.4-5.9 ms
with the copy to a ``[3, H, W]`` tensor), ``torchvision.io.decode_jpeg`` 3.2-3.5 ms, TorchCodec 0.17's
``decode_jpeg`` 3.3-3.7 ms. The three give identical pixels (all are libjpeg-turbo), apply the EXIF orientation
(torchvision when asked) and decode CMYK and grayscale JPEGs to the same RGB.

torchvision 0.29 deprecates its decoders in favour of TorchCodec: every call warns (``DeprecationWarning``),
and a later release removes them. TorchCodec is not faster on the CPU, and its wheels are tied to one torch
release, so it is not a dependency. ``decoder="auto"`` therefore uses torchvision's decoder while it exists
(its warning silenced here), then TorchCodec when it is installed, then PIL.

Pinned memory: :func:`pad_images` builds the batch the DataLoader pins (``pin_memory=True`` on CUDA), one
``uint8`` tensor (in shared memory when built in a worker), so a batch crosses PCIe in one copy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
import torch
from torch.utils.data import get_worker_info

from objcrop.data.images import load_image

__all__ = ["DECODERS", "decode_image", "is_jpeg", "pad_images", "resolve_decoder"]

DECODERS = ("auto", "torchvision", "torchcodec", "pil")

_JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes | np.ndarray) -> bool:
    """True when ``data`` starts like a JPEG file (the SOI marker and a segment marker)."""
    return bytes(data[:3]) == _JPEG_MAGIC


def _torchvision_jpeg(encoded: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # the deprecation is known and handled: see the module docstring
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def _torchcodec_jpeg(encoded: torch.Tensor) -> torch.Tensor:
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(encoded, mode="RGB")  # applies the EXIF orientation itself


def _available(name: str) -> bool:
    if name == "torchvision":
        import torchvision.io

        return hasattr(torchvision.io, "decode_jpeg")
    if name == "torchcodec":
        try:
            from torchcodec.decoders import decode_jpeg  # noqa: F401
        except (ImportError, OSError, RuntimeError):  # missing, or its FFmpeg libraries are
            return False
        return True
    return name == "pil"


@cache
def resolve_decoder(name: str = "auto") -> str:
    """The JPEG decoder ``name`` stands for: ``auto`` is the first available of torchvision, torchcodec, pil.

    Raises:
        ValueError: ``name`` is not one of :data:`DECODERS`, or names a decoder that is not installed.
    """
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose from {', '.join(DECODERS)}")
    if name == "auto":
        return next(n for n in ("torchvision", "torchcodec", "pil") if _available(n))
    if not _available(name):
        raise ValueError(f"decoder {name!r} is not available here (install it, or use decoder='auto')")
    return name


_JPEG_DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "torchvision": _torchvision_jpeg,
    "torchcodec": _torchcodec_jpeg,
}


def _pil_tensor(path: str) -> torch.Tensor:
    # One copy, HWC to CHW; np.asarray alone would give a read-only array.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(load_image(path)).transpose(2, 0, 1)))


def decode_image(path: str | os.PathLike, decoder: str = "auto") -> torch.Tensor:
    """Decodes an image file into an upright RGB ``uint8`` ``[3, H, W]`` tensor.

    Args:
        path: Image file, or a tar shard member ``<shard.tar>#<member>`` (read by PIL).
        decoder: One of :data:`DECODERS`; it decodes JPEG files, PIL the rest.

    Raises:
        FileNotFoundError: ``path`` is not a file (nor a member of an existing shard).
        ImageReadError: As :func:`~objcrop.data.images.load_image`: the file cannot be decoded.
    """
    path = os.fspath(path)
    name = resolve_decoder(decoder)
    if name != "pil" and os.path.isfile(path):
        data = np.fromfile(path, dtype=np.uint8)  # read straight into the array the decoder takes
        if is_jpeg(data):
            try:
                return _JPEG_DECODERS[name](torch.from_numpy(data))
            except RuntimeError:
                pass  # corrupt, truncated or unusual: PIL decides, and names the file if it cannot decode it
    return _pil_tensor(path)


def pad_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacks ``[3, h, w]`` ``uint8`` images into one zero-padded ``[B, 3, H, W]`` batch (top-left aligned).

    Each image that is smaller than its slot has its last row and column repeated once past its edge: the
    bilinear taps of :func:`objcrop.crops.device_views.crop_resize` at the image's border read one pixel
    beyond it, and must find the border there, as PIL's resampling does.
    """
    if not images:
        raise ValueError("no images to pad")
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    out = torch.zeros((len(images), 3, height, width), dtype=torch.uint8)
    if get_worker_info() is not None:  # filled in shared memory: the trip to the main process copies nothing
        out.share_memory_()
    for slot, image in zip(out, images, strict=True):
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected uint8 [3, H, W] images, got {image.dtype} {list(image.shape)}")
        h, w = int(image.shape[1]), int(image.shape[2])
        slot[:, :h, :w] = image
        if h < height:
            slot[:, h, :w] = image[:, h - 1]
        if w < width:
            slot[:, : min(h + 1, height), w] = slot[:, : min(h + 1, height), w - 1]
    return out
