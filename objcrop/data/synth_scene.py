"""One ``objcrop synth`` scene: a background with a few small, partly overlapping objects.

Objects are pasted one after the other at uniformly random positions, fully inside the image;
a later object may hide part of an earlier one. A position that would hide more than
``max_occlusion`` of an earlier object's pixels is redrawn (up to a few tries, then the object
is left out), so every visible object is annotated and every annotated object is at least
``1 - max_occlusion`` visible. Boxes are the full (amodal) extent of each object, including
any part hidden behind a later one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from objcrop.data.synth_backgrounds import BackgroundBank, render_background
from objcrop.data.synth_shapes import SYNTH_CLASSES, Patch, render_object
from objcrop.data.synth_sprites import SpriteBank

__all__ = ["render_scene", "render_scene_with_areas", "paste_patches", "check_scene_args"]

_PLACEMENT_TRIES = 10


def check_scene_args(
    size: int, min_objects: int, max_objects: int, min_scale: float, max_scale: float, max_occlusion: float
) -> None:
    """Raises ValueError for scene settings that cannot work."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if not 0 < min_scale <= max_scale <= 1:
        raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale} and {max_scale}")
    if not 0 <= max_occlusion < 1:
        raise ValueError(f"max_occlusion must be in [0, 1), got {max_occlusion}")


def paste_patches(
    image: np.ndarray, patches: Iterable[Patch], rng: np.random.Generator, max_occlusion: float, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pastes patches into ``image`` (float32, in place) in order until ``limit`` are placed.

    Returns:
        Float32 ``[N, 4]`` xyxy boxes, int32 ``[N]`` labels and float32 ``[N]`` visible areas
        (pixels with coverage above one half) of the placed objects.
    """
    height, width = image.shape[:2]
    owner = np.full((height, width), -1, dtype=np.int32)
    full = np.zeros(0, dtype=np.int64)  # solid pixels of each placed object
    visible = np.zeros(0, dtype=np.int64)  # of those, the ones not hidden by a later object
    boxes, labels = [], []
    for patch in patches:
        if len(boxes) == limit:
            break
        h, w = patch.alpha.shape
        solid = patch.alpha > 0.5
        if h > height or w > width or not solid.any():
            continue
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            under = owner[y0 : y0 + h, x0 : x0 + w]
            hidden = np.bincount(under[solid] + 1, minlength=len(boxes) + 1)[1:]
            if np.all(visible - hidden >= (1 - max_occlusion) * full):
                break
        else:
            continue
        under[solid] = len(boxes)
        visible = np.append(visible - hidden, solid.sum())
        full = np.append(full, solid.sum())
        region = image[y0 : y0 + h, x0 : x0 + w]
        region += patch.alpha[..., None] * (patch.rgb - region)
        boxes.append(patch.box + np.array([x0, y0, x0, y0], dtype=np.float32))
        labels.append(patch.label)
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int32),
        np.asarray(visible, dtype=np.float32),
    )


def render_scene_with_areas(
    rng: np.random.Generator | int,
    size: int = 128,
    *,
    min_objects: int = 2,
    max_objects: int = 6,
    min_scale: float = 0.05,
    max_scale: float = 0.25,
    max_occlusion: float = 0.7,
    sprites: SpriteBank | None = None,
    backgrounds: BackgroundBank | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render_scene`, plus each object's visible area in pixels (COCO's ``area``)."""
    check_scene_args(size, min_objects, max_objects, min_scale, max_scale, max_occlusion)
    rng = np.random.default_rng(rng)
    image = backgrounds.sample(rng, size) if backgrounds is not None else render_background(rng, size)
    wanted = int(rng.integers(min_objects, max_objects + 1))
    # A few spare candidates for the rare object that finds no place. Drawn lazily, so only as many as needed.
    sides = rng.uniform(min_scale, max_scale, size=wanted + 4) * size
    if sprites is not None:
        patches = (sprites.sample(rng, side) for side in sides)
    else:
        patches = (render_object(rng, int(rng.integers(len(SYNTH_CLASSES))), side) for side in sides)
    boxes, labels, areas = paste_patches(image, patches, rng, max_occlusion, wanted)
    image += rng.uniform(1.0, 5.0) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), boxes, labels, areas


def render_scene(
    rng: np.random.Generator | int,
    size: int = 128,
    *,
    min_objects: int = 2,
    max_objects: int = 6,
    min_scale: float = 0.05,
    max_scale: float = 0.25,
    max_occlusion: float = 0.7,
    sprites: SpriteBank | None = None,
    backgrounds: BackgroundBank | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders one scene in memory.

    Args:
        rng: A generator, or a seed for one.
        size: Side of the square image in pixels.
        min_objects: Fewest objects per scene.
        max_objects: Most objects per scene.
        min_scale: Smallest object, as its box's longer side over the image side.
        max_scale: Largest object, likewise.
        max_occlusion: Largest hidden fraction of an object's pixels that a later object may cause.
        sprites: Paste these object photos instead of drawing the procedural classes.
        backgrounds: Crop backgrounds from these photos instead of drawing procedural clutter.

    Returns:
        Uint8 RGB image ``[size, size, 3]``, float32 ``[N, 4]`` xyxy boxes (full object extent)
        and int32 ``[N]`` class indices (into :data:`SYNTH_CLASSES`, or the sprite classes).
    """
    image, boxes, labels, _ = render_scene_with_areas(
        rng,
        size,
        min_objects=min_objects,
        max_objects=max_objects,
        min_scale=min_scale,
        max_scale=max_scale,
        max_occlusion=max_occlusion,
        sprites=sprites,
        backgrounds=backgrounds,
    )
    return image, boxes, labels
