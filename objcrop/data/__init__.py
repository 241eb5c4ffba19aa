"""Dataset readers, image decoding and synthetic scenes. Everything produces :class:`Records`."""

from objcrop.data.records import Record, Records

__all__ = ["Record", "Records"]
