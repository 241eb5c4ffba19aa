"""The ten procedural object classes of ``objcrop synth`` and the drawing of one object.

A class is a (shape, texture, colour family) triple. Each shape, each texture and each colour
family is used by exactly two classes, and two classes share at most one of the three, so any
single cue narrows a class down to two candidates and any two cues identify it. A model must
therefore look at shape or texture, not only at colour, to tell the classes apart.

An object is drawn at 4x resolution and box-filtered down, so its edges are anti-aliased.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

__all__ = ["SYNTH_CLASSES", "ObjectClass", "OBJECT_CLASSES", "Patch", "render_object", "texture_mask", "TEXTURES"]

SHAPES = ("star", "ring", "triangle", "cross", "crescent")
TEXTURES = ("striped", "dotted", "checkered", "concentric", "speckled")
# Hue of each colour family in degrees.
COLOUR_HUES = {"red": 0.0, "blue": 220.0, "green": 125.0, "yellow": 52.0, "purple": 285.0}

_SUPERSAMPLE = 4
_SHIFT = 4
_HUE_JITTER = 10.0  # degrees either side of the family hue


@dataclass(frozen=True)
class ObjectClass:
    """How one class looks: its outline, the pattern inside it and its colour family."""

    shape: str
    texture: str
    colour: str

    @property
    def name(self) -> str:
        """The class name, ``<colour>_<texture>_<shape>``."""
        return f"{self.colour}_{self.texture}_{self.shape}"


OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("star", "striped", "red"),
    ObjectClass("ring", "dotted", "blue"),
    ObjectClass("triangle", "checkered", "green"),
    ObjectClass("cross", "concentric", "yellow"),
    ObjectClass("crescent", "speckled", "purple"),
    ObjectClass("star", "dotted", "green"),
    ObjectClass("ring", "checkered", "yellow"),
    ObjectClass("triangle", "concentric", "purple"),
    ObjectClass("cross", "speckled", "red"),
    ObjectClass("crescent", "striped", "blue"),
)
SYNTH_CLASSES: tuple[str, ...] = tuple(c.name for c in OBJECT_CLASSES)


class Patch(NamedTuple):
    """One object ready to be pasted.

    Attributes:
        rgb: Float32 ``[h, w, 3]`` colours in 0..255.
        alpha: Float32 ``[h, w]`` coverage in 0..1.
        box: Float32 ``[4]`` xyxy extent of the object inside the patch.
        label: Class index.
    """

    rgb: np.ndarray
    alpha: np.ndarray
    box: np.ndarray
    label: int


def _circle(n: int, radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _outline(shape: str, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """The shape around the origin in unit coordinates: its outer polygon and its holes."""
    if shape == "star":
        inner = rng.uniform(0.38, 0.5)
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1), []
    if shape == "ring":
        return _circle(48), [_circle(48, rng.uniform(0.42, 0.58))]
    if shape == "triangle":
        t = np.deg2rad(np.array([-90.0, 30.0, 150.0]) + rng.uniform(-8, 8, size=3))
        return np.stack([np.cos(t), np.sin(t)], axis=1), []
    if shape == "cross":
        a = rng.uniform(0.2, 0.3)  # half the arm width
        q = np.array([[a, 1], [a, a], [1, a]])
        pts = []
        for k in range(4):  # the quarter outline, turned four times
            c, s = math.cos(k * np.pi / 2), math.sin(k * np.pi / 2)
            pts.append(q @ np.array([[c, -s], [s, c]]))
        return np.concatenate(pts), []
    if shape == "crescent":
        # The unit disk minus a disk of radius r centred at (d, 0): the outer arc, then the inner arc back.
        d, r = rng.uniform(0.4, 0.55), rng.uniform(0.75, 0.88)
        xi = (1 + d * d - r * r) / (2 * d)
        yi = math.sqrt(max(1 - xi * xi, 0.0))
        phi = math.atan2(yi, xi)
        psi = math.atan2(yi, xi - d)
        outer = np.linspace(phi, 2 * np.pi - phi, 36)
        inner = np.linspace(2 * np.pi - psi, psi, 30)
        pts = np.concatenate(
            [
                np.stack([np.cos(outer), np.sin(outer)], axis=1),
                np.stack([d + r * np.cos(inner), r * np.sin(inner)], axis=1),
            ]
        )
        return pts, []
    raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Where a texture takes its second colour, as float32 0/1 over the pixel coordinates ``u, v``.

    ``u, v`` are pixel offsets from the object's centre in the texture's own (rotated) frame;
    ``period`` is the pattern's repeat in pixels.
    """
    if texture == "striped":
        t = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) > 0
    elif texture == "dotted":
        grid = 1.3 * period
        radius = grid * rng.uniform(0.26, 0.34)
        du = np.mod(u / grid + rng.uniform(0, 1), 1.0) - 0.5
        dv = np.mod(v / grid + rng.uniform(0, 1), 1.0) - 0.5
        t = (du * du + dv * dv) * grid * grid < radius * radius
    elif texture == "checkered":
        cells = np.floor(u / period + rng.uniform(0, 1)) + np.floor(v / period + rng.uniform(0, 1))
        t = np.mod(cells, 2) == 1
    elif texture == "concentric":
        t = np.sin(2 * np.pi * np.hypot(u, v) / period + rng.uniform(0, 2 * np.pi)) > 0
    elif texture == "speckled":
        # Thresholded smooth noise: irregular blobs about half a period wide.
        h, w = u.shape
        extent = max(float(np.ptp(u)), float(np.ptp(v)), 1.0)
        cells = max(2, int(round(2 * extent / period)) + 1)
        noise = rng.random((cells, cells)).astype(np.float32)
        smooth = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
        t = smooth > np.median(smooth)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return t.astype(np.float32)


def _hsv_colour(hue_deg: float, sat: float, val: float) -> np.ndarray:
    """An RGB colour in 0..255 from hue in degrees and saturation and value in 0..1."""
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, sat, val), dtype=np.float32) * 255.0


def render_object(rng: np.random.Generator, label: int, longest_side: float) -> Patch:
    """Draws one object of class ``label`` whose box's longer side is ``longest_side`` pixels.

    Within-class variation: rotation, aspect ratio (0.7..1), shape details (star depth, ring
    hole, arm width), hue within the family, saturation, value, texture period, phase and
    angle, and a linear shading.
    """
    cls = OBJECT_CLASSES[label]
    outer, holes = _outline(cls.shape, rng)
    theta = rng.uniform(0, 2 * np.pi)
    c, s = math.cos(theta), math.sin(theta)
    transform = np.array([[c, -s], [s, c]]) @ np.diag([1.0, rng.uniform(0.7, 1.0)])
    outer = outer @ transform.T
    holes = [h @ transform.T for h in holes]

    lo, hi = outer.min(axis=0), outer.max(axis=0)
    scale = float(longest_side) / float((hi - lo).max())
    pad = 1
    extent = (hi - lo) * scale
    width, height = int(math.ceil(extent[0])) + 2 * pad, int(math.ceil(extent[1])) + 2 * pad

    ss = _SUPERSAMPLE

    def to_fixed(points: np.ndarray) -> np.ndarray:  # cv2's fixed-point vertices, _SHIFT fractional bits
        return np.round(((points - lo) * scale + pad) * ss * (1 << _SHIFT)).astype(np.int32)

    mask = np.zeros((height * ss, width * ss), dtype=np.uint8)
    cv2.fillPoly(mask, [to_fixed(outer)], 255, lineType=cv2.LINE_8, shift=_SHIFT)
    for hole in holes:
        cv2.fillPoly(mask, [to_fixed(hole)], 0, lineType=cv2.LINE_8, shift=_SHIFT)

    centre = (-lo) * scale + pad
    x = (np.arange(width * ss, dtype=np.float32) + 0.5) / ss - centre[0]
    y = (np.arange(height * ss, dtype=np.float32)[:, None] + 0.5) / ss - centre[1]
    tex_angle = rng.uniform(0, 2 * np.pi)
    ct, st = math.cos(tex_angle), math.sin(tex_angle)
    u, v = ct * x + st * y, -st * x + ct * y
    period = max(3.0, longest_side * rng.uniform(0.16, 0.26))
    second = texture_mask(cls.texture, u, v, period, rng)

    # The colour is linear in the texture mask, so mixing after the box filter gives the same result, cheaper.
    second = cv2.resize(second, (width, height), interpolation=cv2.INTER_AREA)
    alpha = cv2.resize(mask.astype(np.float32) / 255.0, (width, height), interpolation=cv2.INTER_AREA)
    hue = COLOUR_HUES[cls.colour] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)
    base = _hsv_colour(hue, rng.uniform(0.55, 0.95), rng.uniform(0.65, 0.95))
    dark = base * rng.uniform(0.25, 0.5)
    rgb = base + second[..., None] * (dark - base)
    light = rng.uniform(-0.25, 0.25, size=2) / max(longest_side, 1.0)
    yc, xc = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    rgb *= (1.0 + light[0] * (xc - centre[0]) + light[1] * (yc - centre[1]))[..., None]
    box = np.array([pad, pad, pad + extent[0], pad + extent[1]], dtype=np.float32)
    return Patch(np.clip(rgb, 0, 255), alpha, box, int(label))
