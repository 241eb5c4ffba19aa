"""objcrop: object-aware cropping for self-supervised learning."""

__version__ = "0.1.0"
