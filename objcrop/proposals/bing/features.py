"""Normed-gradient (NG) features of BING: window-size grids, where each window lies, and the gradient maps.

A window size ``(w, h)`` is scored by resizing the image so that a ``w x h`` window becomes ``8 x 8`` pixels
and sliding an 8x8 filter over the gradient magnitude of that resized image. Training reads its features from
the very same maps, so training and detection cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from objcrop.proposals.bing import _kernels

__all__ = [
    "COLOUR_SPACES",
    "RESIZE_MODES",
    "WINDOW",
    "WindowLayout",
    "size_grid",
    "window_layout",
    "as_rgb",
    "ResizePlan",
    "ResizedImage",
]

WINDOW = 8
COLOUR_SPACES = ("rgb", "hsv", "gray")
# "direct": bilinear from the full image for every size, bit-exact (INTER_LINEAR_EXACT) and, for gray, converted
# after resizing, as OpenCV's BING does (its trained models expect it; the same maps give the same windows).
# "pyramid": a map whose size is about half of an already computed one in width and/or height is
# box-filtered from it; the others are bilinear from the full image. Several times cheaper, and less aliased.
RESIZE_MODES = ("direct", "pyramid")
# Gradient rule per colour space (see _kernels.normed_gradient): True sums channel differences, False takes the max.
_SUMMED = {"rgb": False, "hsv": True, "gray": False}


def size_grid(side_lengths=(16, 32, 64, 128, 256, 512)) -> np.ndarray:
    """All ``(width, height)`` pairs of ``side_lengths``, height-major (OpenCV's size index order).

    The paper's text names sides 10..320; the authors' code and OpenCV use 16..512 (``2 ** 4 .. 2 ** 9``).
    """
    sides = np.asarray(side_lengths, dtype=np.int32).reshape(-1)
    if sides.size == 0 or (sides < 1).any():
        raise ValueError(f"window side lengths must be positive, got {side_lengths}")
    hh, ww = np.meshgrid(sides, sides, indexing="ij")
    return np.stack([ww.ravel(), hh.ravel()], axis=1)


@dataclass(frozen=True)
class WindowLayout:
    """Where the windows of each size lie in one image.

    Attributes:
        width: Image width.
        height: Image height.
        index: Int64 ``[S]`` rows of the size table that apply to this image (sizes at most twice the image).
        map_w: Int32 ``[S]`` width of the image resized for each size.
        map_h: Int32 ``[S]`` height of the resized image.
    """

    width: int
    height: int
    index: np.ndarray
    map_w: np.ndarray
    map_h: np.ndarray

    @property
    def res_w(self) -> np.ndarray:
        """Width of each response map (window positions per row)."""
        return self.map_w - (WINDOW - 1)

    @property
    def res_h(self) -> np.ndarray:
        """Height of each response map (window positions per column)."""
        return self.map_h - (WINDOW - 1)

    def subset(self, slots: np.ndarray) -> WindowLayout:
        """The layout of the sizes at ``slots`` only."""
        return WindowLayout(self.width, self.height, self.index[slots], self.map_w[slots], self.map_h[slots])

    def boxes(self, slot: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Boxes (float32 xyxy pixels) of the windows at flat ``position`` of the response map of size ``slot``."""
        slot = np.asarray(slot, dtype=np.int64)
        position = np.asarray(position, dtype=np.int64)
        rw = self.res_w[slot].astype(np.int64)
        sx = self.width / self.map_w[slot]
        sy = self.height / self.map_h[slot]
        px, py = position % rw, position // rw
        out = np.stack([px * sx, py * sy, (px + WINDOW) * sx, (py + WINDOW) * sy], axis=1)
        return out.astype(np.float32)


def window_layout(width: int, height: int, sizes: np.ndarray) -> WindowLayout:
    """Lays out ``sizes`` (int ``[S, 2]`` of ``(w, h)``) on a ``width x height`` image.

    As in OpenCV, sizes more than twice the image are skipped and the others are clipped to the image.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    keep = np.flatnonzero((sizes[:, 0] <= 2 * width) & (sizes[:, 1] <= 2 * height))
    w = np.minimum(sizes[keep, 0], width)
    h = np.minimum(sizes[keep, 1], height)
    map_w = np.maximum(np.rint(WINDOW * width / w), WINDOW).astype(np.int32)
    map_h = np.maximum(np.rint(WINDOW * height / h), WINDOW).astype(np.int32)
    return WindowLayout(int(width), int(height), keep, map_w, map_h)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Checks an image: uint8 ``HxWx3`` RGB; a grayscale ``HxW`` or ``HxWx1`` image is replicated to RGB."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"BING expects a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"BING expects an HxWx3 RGB image, got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image of {arr.shape[1]}x{arr.shape[0]} pixels is too small for gradients")
    return np.ascontiguousarray(arr)


def _pyramid_plan(layout: WindowLayout) -> tuple[np.ndarray, np.ndarray]:
    """Order to build the maps in (largest first) and, per map, the map to halve it from (-1: the image).

    A parent has the same length or about twice the length (+-1 for odd lengths) along each axis; the
    smallest such map is taken.
    """
    mw = layout.map_w.astype(np.int64)
    mh = layout.map_h.astype(np.int64)
    area = mw * mh

    def fits(m: np.ndarray) -> np.ndarray:  # [child, parent]
        return (m[None, :] == m[:, None]) | (np.abs(m[None, :] - 2 * m[:, None]) <= 1)

    ok = fits(mw) & fits(mh) & (area[None, :] > area[:, None])
    cost = np.where(ok, area[None, :], np.iinfo(np.int64).max)
    parent = np.where(ok.any(axis=1), cost.argmin(axis=1), -1)
    return np.argsort(-area, kind="stable"), parent.astype(np.int64)


@dataclass(frozen=True)
class ResizePlan:
    """How to resize an image of one size for the window sizes of a layout (reusable for every such image).

    Attributes:
        colour_space: ``rgb``, ``hsv`` or ``gray``.
        layout: The window sizes and their map sizes.
        channels: 3, or 1 for gray.
        offsets: Int64 ``[S + 1]``; map ``i`` is ``[map_h[i], map_w[i], channels]`` at ``offsets[i]``.
        order: Int64 ``[S]`` order to build the maps in (parents first).
        parent: Int64 ``[S]`` map halved to get each map, -1 where the map is resized from the image.
        exact: Resize as OpenCV's BING does (``direct`` mode): ``INTER_LINEAR_EXACT``, gray after resizing.
    """

    colour_space: str
    layout: WindowLayout
    channels: int
    offsets: np.ndarray
    order: np.ndarray
    parent: np.ndarray
    exact: bool = False

    @classmethod
    def make(cls, layout: WindowLayout, colour_space: str, mode: str = "direct") -> ResizePlan:
        """The plan of ``layout`` in ``colour_space``; ``pyramid`` halves a larger map where one fits."""
        if colour_space not in COLOUR_SPACES:
            raise ValueError(f"unknown colour space {colour_space!r}; expected one of {COLOUR_SPACES}")
        if mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
        channels = 1 if colour_space == "gray" else 3
        counts = layout.map_w.astype(np.int64) * layout.map_h * channels
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        n = len(counts)
        order, parent = _pyramid_plan(layout) if mode == "pyramid" else (np.arange(n), np.full(n, -1, np.int64))
        return cls(colour_space, layout, channels, offsets, order, parent, exact=mode == "direct")

    @property
    def total(self) -> int:
        """Bytes of all maps together."""
        return int(self.offsets[-1])


@dataclass(frozen=True)
class ResizedImage:
    """The image resized once per window size, all in one flat buffer (what the kernels read).

    Attributes:
        colour_space: ``rgb``, ``hsv`` or ``gray``.
        layout: The window layout the sizes follow.
        pixels: Uint8 flat buffer; size ``i`` is ``[map_h[i], map_w[i], channels]`` at ``offsets[i]``.
        offsets: Int64 ``[S + 1]``.
        channels: 3, or 1 for gray.
    """

    colour_space: str
    layout: WindowLayout
    pixels: np.ndarray
    offsets: np.ndarray
    channels: int

    @property
    def summed(self) -> bool:
        """Whether the gradient sums the channel differences (HSV) rather than taking their maximum."""
        return _SUMMED[self.colour_space]

    @classmethod
    def build(
        cls,
        rgb: np.ndarray,
        colour_space: str,
        layout: WindowLayout,
        buffer: np.ndarray | None = None,
        mode: str = "direct",
        plan: ResizePlan | None = None,
    ) -> ResizedImage:
        """Resizes ``rgb`` (checked with :func:`as_rgb`) for every size of ``layout``, in ``colour_space``.

        Args:
            rgb: The image.
            colour_space: ``rgb``, ``hsv`` or ``gray``.
            layout: The window sizes and their map sizes.
            buffer: Uint8 scratch memory to hold the pixels if it is large enough (reused across images).
            mode: One of :data:`RESIZE_MODES`.
            plan: The :class:`ResizePlan` of these arguments, if already made.
        """
        plan = plan or ResizePlan.make(layout, colour_space, mode)
        colour_space, layout = plan.colour_space, plan.layout
        # Gray is linear in RGB, so converting before resizing is the same up to rounding and 3x cheaper; the exact
        # (OpenCV) plan converts after resizing, as OpenCV's BING does, so that its models see the same pixels.
        gray_first = colour_space == "gray" and not plan.exact
        source = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if gray_first else rgb
        interpolation = cv2.INTER_LINEAR_EXACT if plan.exact else cv2.INTER_LINEAR
        total, offsets, channels = plan.total, plan.offsets, plan.channels
        pixels = buffer[:total] if buffer is not None and buffer.size >= total else np.empty(total, np.uint8)
        for i in np.flatnonzero(plan.parent < 0).tolist():
            mw, mh = int(layout.map_w[i]), int(layout.map_h[i])
            dst = pixels[offsets[i] : offsets[i + 1]].reshape((mh, mw) if channels == 1 else (mh, mw, 3))
            if channels == 1 and not gray_first:
                cv2.cvtColor(cv2.resize(source, (mw, mh), interpolation=interpolation), cv2.COLOR_RGB2GRAY, dst=dst)
            else:
                cv2.resize(source, (mw, mh), dst=dst, interpolation=interpolation)
        if (plan.parent >= 0).any():
            _kernels.build_pyramid(pixels, offsets, layout.map_h, layout.map_w, channels, plan.order, plan.parent)
        if colour_space == "hsv" and total:
            # OpenCV's BING converts after resizing (hue does not interpolate well). One call for all maps.
            flat = pixels.reshape(1, -1, 3)
            cv2.cvtColor(flat, cv2.COLOR_RGB2HSV, dst=flat)
        return cls(colour_space, layout, pixels, offsets, channels)

    def gradient(self, slot: int) -> np.ndarray:
        """The uint8 normed-gradient map of size ``slot``."""
        mh, mw = int(self.layout.map_h[slot]), int(self.layout.map_w[slot])
        img = self.pixels[self.offsets[slot] : self.offsets[slot + 1]].reshape(mh, mw, self.channels)
        mag = np.empty((mh, mw), dtype=np.uint8)
        _kernels.normed_gradient(img, self.summed, mag)
        return mag
