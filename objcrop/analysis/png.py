"""Which PNG files objcrop wrote: its pictures carry the text chunk ``Software: objcrop <version>``.

That chunk is the proof (:func:`png_is_ours`) that lets a later run replace the file at a ``--out`` or
``--plot`` path (see :func:`objcrop.io.check_replaceable`); any other file there is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import objcrop
from objcrop.io import check_replaceable

__all__ = ["PNG_METADATA", "check_png_out", "png_is_ours"]

# The PNG text chunk of objcrop's pictures (matplotlib writes it as a tEXt chunk before the image data).
PNG_METADATA = {"Software": f"objcrop {objcrop.__version__}"}


def png_is_ours(path: Path) -> bool:
    """Whether ``path`` is a PNG whose ``Software`` text chunk names objcrop (PNGs written before the
    chunk was added have matplotlib's and count as foreign)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the chunks before the image data only
            return image.format == "PNG" and str(image.info.get("Software", "")).startswith("objcrop ")
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def check_png_out(path: str | os.PathLike) -> Path:
    """``path`` when a PNG may be written there (see :func:`objcrop.io.check_replaceable`)."""
    return check_replaceable(path, png_is_ours)
