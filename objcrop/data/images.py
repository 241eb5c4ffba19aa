"""Robust image decoding: always RGB, EXIF orientation applied, clear errors naming the file.

``load_image`` and ``image_size`` read the orientation the same way (from the file header), so
``image_size(path) == load_image(path).size`` holds by construction and boxes stored with header
sizes always match the decoded pixels.

Besides files, both read members of tar shards (webdataset): a path ``<shard.tar>#<member>``
(see :mod:`objcrop.data.webdataset`) names one member, read without extracting the shard.
``load_image_bytes`` and ``image_size_bytes`` decode images already in memory (a streamed sample).
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, TiffImagePlugin

__all__ = [
    "IMAGE_EXTENSIONS",
    "TRANSPARENT_FILL",
    "ImageReadError",
    "is_image_file",
    "load_image",
    "load_image_bytes",
    "image_size",
    "image_size_bytes",
    "relative_image_paths",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Transparent pixels are composited onto mid-gray: after mean/std normalization it is close to zero,
# so transparent areas carry neither a strong black nor a strong white signal.
TRANSPARENT_FILL = (128, 128, 128)

# EXIF orientation -> transpose that shows the image upright (the table of ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageReadError(ValueError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image, too large)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def _open(path: str) -> Image.Image:
    if not os.path.isfile(path):
        # Only reached for paths that are no file: a tar member "<shard.tar>#<member>", or missing.
        from objcrop.data.webdataset import read_member, split_member_path

        member = split_member_path(path)
        if member is None:
            raise FileNotFoundError(errno.ENOENT, "image not found", path)
        return _open_bytes(read_member(*member), path)
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return Image.open(path)


def _open_bytes(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    return Image.open(io.BytesIO(data))


def _orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation known from the header, 1 when absent or invalid."""
    # The base-class method on purpose: PngImageFile.getexif decodes all pixels to look for an eXIf
    # chunk after the image data, which would make image_size a full decode.
    value = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
    return value if value in _TRANSPOSE else 1


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """Size after the orientation is applied, from the header."""
    w, h = img.size
    if isinstance(img, TiffImagePlugin.TiffImageFile):
        # Recent PIL reports (and decodes) TIFFs upright already; start from the stored dimensions.
        w, h = img.tag_v2.get(256, w), img.tag_v2.get(257, h)
    return (h, w) if _orientation(img) >= 5 else (w, h)


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images: scales ``[min(0, lo), hi]`` of the values to 0..255."""
    values = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    lo = min(0.0, float(values.min())) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    gray = np.round((values - lo) * scale).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENT_FILL, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decodes an image fully into an upright RGB image.

    Conversions: grayscale, palette, CMYK and 1-bit images are converted to RGB; transparent pixels
    (alpha channel or palette/colour-key transparency) are composited onto :data:`TRANSPARENT_FILL`
    (mid-gray); 16-bit, 32-bit and float images are scaled from their value range ``[min(0, lo), hi]``
    to 0..255 instead of being clipped at 255. The EXIF orientation is applied.

    Args:
        path: Image file, or a tar shard member ``<shard.tar>#<member>``.
        draft_size: ``(width, height)`` of the upright image that is needed at least. JPEGs are then
            decoded at a reduced scale (1/2, 1/4 or 1/8) that is still at least this large; other
            formats ignore it. The aspect ratio is kept.

    Returns:
        The decoded RGB image.

    Raises:
        FileNotFoundError: ``path`` is not a file (nor a member of an existing shard).
        ImageReadError: The file is empty, not an image, corrupt, truncated, or larger than PIL's
            decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``).
    """
    path = os.fspath(path)
    return _decode(path, lambda: _open(path), draft_size)


def load_image_bytes(data: bytes, name: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """:func:`load_image` for an encoded image in memory (a streamed tar member, for example).

    Args:
        data: The encoded image (the bytes of a file).
        name: What errors call the image (its shard and key, say).
        draft_size: As for :func:`load_image`.

    Raises:
        ImageReadError: ``data`` is empty, not an image, corrupt, truncated or too large.
    """
    return _decode(name, lambda: _open_bytes(data, name), draft_size)


def _decode(path: str, opener: Callable[[], Image.Image], draft_size: tuple[int, int] | None) -> Image.Image:
    if draft_size is not None and (len(draft_size) != 2 or min(draft_size) < 1):
        raise ValueError(f"draft_size must be two positive integers, got {draft_size}")
    try:
        with opener() as img:
            # Read before load(): PIL keeps this EXIF, so an eXIf chunk after PNG pixel data is ignored
            # here exactly as in image_size.
            orientation = _orientation(img)
            if draft_size is not None:
                w, h = (int(s) for s in draft_size)
                img.draft(None, (h, w) if orientation >= 5 else (w, h))
            img.load()
            # Some loaders (TIFF) apply the orientation while loading and drop the tag: ask again.
            orientation = _orientation(img)
            out = _to_rgb(img)
            if orientation in _TRANSPOSE:
                out = out.transpose(_TRANSPOSE[orientation])
            elif out is img:
                out = img.copy()
            return out
    except (FileNotFoundError, ImageReadError, MemoryError):
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"refused by the decompression-bomb guard: {err}") from err
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from err


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the upright image, read from the header only (no pixel decoding).

    EXIF orientations 5 to 8 swap width and height, so the result equals ``load_image(path).size``.
    A file whose header is fine but whose pixel data is truncated is only caught by :func:`load_image`.

    ``path`` may be a tar shard member ``<shard.tar>#<member>``, as for :func:`load_image`.

    Raises:
        FileNotFoundError: ``path`` is not a file (nor a member of an existing shard).
        ImageReadError: The header cannot be parsed, or the image exceeds the decompression-bomb limit.
    """
    path = os.fspath(path)
    return _header_size(path, lambda: _open(path))


def image_size_bytes(data: bytes, name: str) -> tuple[int, int]:
    """:func:`image_size` of an encoded image in memory; errors name ``name``."""
    return _header_size(name, lambda: _open_bytes(data, name))


def _header_size(path: str, opener: Callable[[], Image.Image]) -> tuple[int, int]:
    try:
        with opener() as img:
            return _upright_size(img)
    except (FileNotFoundError, ImageReadError, MemoryError):
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"refused by the decompression-bomb guard: {err}") from err
    except Exception as err:
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from err


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk gives undecodable bytes as surrogate escapes
        return False
    return True


def relative_image_paths(root: str | os.PathLike, undecodable: list[bytes] | None = None) -> list[str]:
    """Image files under ``root`` (recursive), as sorted POSIX paths relative to ``root``; hidden
    files and folders (names starting with ".") are skipped.

    Folder symlinks are followed once: a link to a folder inside ``root`` (a loop, or a second name
    for a listed folder) or to a folder already listed is not entered again. Names that are not
    valid UTF-8 cannot be image keys: they are left out, and their bytes (relative to ``root``;
    folders end with ``/``) are appended to ``undecodable`` so that the caller can count them.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "image folder not found", str(root))
    real_root = os.path.realpath(root)
    entered = {real_root}
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        rel = Path(folder).relative_to(root)
        keep = []
        for d in sorted(dirs):
            path = os.path.join(folder, d)
            if d.startswith("."):
                continue
            if not _is_utf8(d):
                if undecodable is not None:
                    undecodable.append(os.fsencode((rel / d).as_posix()) + b"/")
                continue
            if os.path.islink(path):
                real = os.path.realpath(path)
                if real in entered or os.path.commonpath([real, real_root]) == real_root:
                    continue
            entered.add(os.path.realpath(path))
            keep.append(d)
        dirs[:] = keep
        for f in files:
            if not is_image_file(f) or f.startswith("."):
                continue
            if _is_utf8(f):
                found.append((rel / f).as_posix())
            elif undecodable is not None:
                undecodable.append(os.fsencode((rel / f).as_posix()))
    return sorted(found)
