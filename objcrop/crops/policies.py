"""View-pair policies: where the two views of a sample come from.

A policy is pure geometry. Given an image size, that image's proposals (best first) and a
random generator, it returns two crop boxes and their view kinds. It never touches pixels, so
training, ``objcrop show`` and ``objcrop analyze coverage`` all run the same code.

Each policy first chooses two *regions* (the whole image, a proposal, the proposal dilated or
shifted), then samples a RandomResizedCrop box inside each region.

The RandomResizedCrop inside an object region needs an area range of its own. The paper (section 3,
"Discussion on lower scale of random resized crop") uses one dataset-level lower bound,
``S_min = scene_scale[0] / (mean area fraction of the proposals the policy draws from)``: proposals cover
less of the image than the image does, so the object crop may keep more of its region. That is the
default here (``object_scale="paper"``); :meth:`ViewPairPolicy.calibrate` computes it from a store.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from objcrop import boxes as B
from objcrop import registry

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECT_SCALE_MODES",
    "VIEW_KINDS",
    "KIND_CODES",
    "POLICIES",
    "ViewPair",
    "ViewPairPolicy",
    "make_policy",
    "random_resized_crop_box",
]

VIEW_KINDS = ("object", "dilated", "shifted", "scene")
KIND_CODES = {k: i for i, k in enumerate(VIEW_KINDS)}

# name -> (region of view 1, region of view 2), registered in objcrop.registry (one line per policy).
POLICIES = registry.POLICIES


# How the RandomResizedCrop area range of object/dilated/shifted regions is chosen (besides a
# fixed ``(lo, hi)`` pair): the paper's dataset-level S_min, or one lower bound per region.
OBJECT_SCALE_MODES = ("paper", "per-region")

# Calibration reads at most this many images (evenly spaced): the mean area fraction of 20k images has a
# standard error far below the resolution that matters for a crop range, and COCO's 118k would cost ~3 s.
_CALIBRATION_IMAGES = 20_000


@dataclass(frozen=True)
class ViewPair:
    """The geometry of one sample.

    Attributes:
        regions: Float32 ``[2, 4]`` xyxy regions the crops were sampled in.
        crops: Float32 ``[2, 4]`` xyxy crop boxes; the views are these boxes resized.
        kinds: View kind of each crop, from :data:`VIEW_KINDS`.
        fallback: True when the policy wanted a proposal but the image had none usable, so
            both views became scene crops.
    """

    regions: np.ndarray
    crops: np.ndarray
    kinds: tuple[str, str]
    fallback: bool = False


def random_resized_crop_box(
    region: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> np.ndarray:
    """Samples a RandomResizedCrop box inside ``region`` (xyxy), like torchvision's ``get_params``.

    The crop covers a fraction of the region's area drawn from ``scale`` with an aspect ratio
    drawn log-uniformly from ``ratio``. After ``attempts`` misses it falls back to the largest
    centred crop whose ratio lies in ``ratio``. Scalar maths on purpose: this runs once per view,
    and numpy's per-call overhead on 10-element arrays costs more than the arithmetic.
    """
    x1, y1, x2, y2 = (float(v) for v in region)
    rw, rh = x2 - x1, y2 - y1
    region_area = rw * rh
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    draws = rng.random(4 * attempts).tolist()
    for a in range(attempts):
        target = region_area * (scale[0] + (scale[1] - scale[0]) * draws[4 * a])
        aspect = math.exp(log_lo + (log_hi - log_lo) * draws[4 * a + 1])
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= rw and 0 < h <= rh:
            cx = x1 + (rw - w) * draws[4 * a + 2]
            cy = y1 + (rh - h) * draws[4 * a + 3]
            return np.array([cx, cy, cx + w, cy + h], dtype=np.float32)
    in_ratio = rw / rh if rh > 0 else 1.0
    if in_ratio < ratio[0]:
        w, h = rw, rw / ratio[0]
    elif in_ratio > ratio[1]:
        h, w = rh, rh * ratio[1]
    else:
        w, h = rw, rh
    cx, cy = x1 + (rw - w) / 2, y1 + (rh - h) / 2
    return np.array([cx, cy, cx + w, cy + h], dtype=np.float32)


class ViewPairPolicy:
    """Chooses the two crop boxes of a sample, as in Mishra et al., "Object-Aware Cropping".

    Args:
        name: One of :data:`POLICIES`.
        delta: Dilation as a fraction of the image size (``dilated`` regions).
        shift_radius: Range in pixels of the shift of ``shifted`` regions.
        topk: The object region is one of the first ``topk`` usable proposals, uniformly.
        scene_scale: RandomResizedCrop area range for scene regions (MoCo-v2: 0.2-1).
        object_scale: RandomResizedCrop area range for object/dilated/shifted regions:
            ``"paper"`` (default): ``(S_min, 1)`` with the paper's dataset-level
            ``S_min = scene_scale[0] / mean proposal area fraction``, set by :meth:`calibrate`; until a
            policy is calibrated it uses the ``per-region`` rule, with the same cap.
            ``"per-region"`` (or ``None``): per region, the lower bound that makes the smallest object crop
            as large as the smallest scene crop (``scene_scale[0] * image area / region area``).
            A pair ``(lo, hi)`` is used as given, ``(1, 1)`` included.
        object_scale_cap: Largest lower bound the ``paper`` and ``per-region`` rules may produce. Both
            rules give a bound of 1 (the crop is always the whole box, one distinct view) for proposals
            smaller than the smallest scene crop, so the two views of obj-obj-dilate would nest
            trivially; the paper wants both regions "followed by a random crop". 0.9 keeps at least 10 %
            of area variation (about 5 % of each side, a few pixels of jitter at 64-224 px views) while
            still cropping almost the whole object, which is the point of a small-object crop. Must be in
            ``(0, 1]``; 1 restores the uncapped rule.
        scene_ratio: Aspect-ratio range of scene crops.
        object_ratio: Aspect-ratio range of object crops (defaults to ``scene_ratio``).
        min_box_size: Proposals with a side below this grow around their centre to this size
            (the paper's appendix G uses the crop size, 224). 0 disables it.
        min_proposal_size: Proposals with a side below this many pixels are unusable.
        swap: Swap the two views (and their kinds) with probability 0.5.
    """

    def __init__(
        self,
        name: str = "obj-obj-dilate",
        delta: float = 0.1,
        shift_radius: tuple[float, float] = (80.0, 100.0),
        topk: int = 10,
        scene_scale: tuple[float, float] = (0.2, 1.0),
        object_scale: str | tuple[float, float] | None = "paper",
        object_scale_cap: float = 0.9,
        scene_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        object_ratio: tuple[float, float] | None = None,
        min_box_size: float = 0.0,
        min_proposal_size: float = 2.0,
        swap: bool = True,
    ) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if object_scale is None:
            object_scale = "per-region"
        if isinstance(object_scale, str):
            if object_scale not in OBJECT_SCALE_MODES:
                raise ValueError(
                    f"object_scale must be one of {', '.join(OBJECT_SCALE_MODES)} or a pair [lo, hi], "
                    f"got {object_scale!r}"
                )
            fixed_object_scale = None
        else:
            fixed_object_scale = _scale_pair("object_scale", object_scale)
        _scale_pair("scene_scale", scene_scale)
        if not (math.isfinite(object_scale_cap) and 0 < object_scale_cap <= 1):
            raise ValueError(f"object_scale_cap must be in (0, 1], got {object_scale_cap}")
        if not math.isfinite(delta):
            raise ValueError(f"delta must be finite, got {delta}")
        self.name = name
        self.region_kinds = POLICIES[name]
        if len(self.region_kinds) != 2 or not set(self.region_kinds) <= set(VIEW_KINDS):
            raise ValueError(f"policy {name!r}: expected two regions of {VIEW_KINDS}, got {self.region_kinds!r}")
        self.delta = 0.0 if name == "obj-obj" else float(delta)
        self.shift_radius = (float(shift_radius[0]), float(shift_radius[1]))
        self.topk = int(topk)
        self.scene_scale = (float(scene_scale[0]), float(scene_scale[1]))
        # The mode ("paper" / "per-region") or the fixed pair; resolved_object_scale is the paper
        # range once calibrate() has seen the proposals.
        self.object_scale = fixed_object_scale if fixed_object_scale is not None else object_scale
        self.object_scale_cap = float(object_scale_cap)
        self.resolved_object_scale: tuple[float, float] | None = fixed_object_scale
        self.calibration: dict | None = None
        self.scene_ratio = (float(scene_ratio[0]), float(scene_ratio[1]))
        self.object_ratio = (
            self.scene_ratio if object_ratio is None else (float(object_ratio[0]), float(object_ratio[1]))
        )
        self.min_box_size = float(min_box_size)
        self.min_proposal_size = float(min_proposal_size)
        self.swap = swap

    @property
    def uses_proposals(self) -> bool:
        """Whether a view comes from a proposal (every policy but ``scene-scene``)."""
        return any(k != "scene" for k in self.region_kinds)

    def __repr__(self) -> str:
        return (
            f"ViewPairPolicy({self.name!r}, delta={self.delta}, topk={self.topk}, "
            f"scene_scale={self.scene_scale}, object_scale={self.object_scale_range()!r})"
        )

    def object_scale_range(self) -> tuple[float, float] | str:
        """The object crops' area range: a pair, or ``"per-region (lo <= cap)"`` when it depends on the region."""
        if self.resolved_object_scale is not None:
            return self.resolved_object_scale
        return f"per-region (lo <= {self.object_scale_cap:g})"

    def describe_object_scale(self) -> str:
        """One line for logs and reports: the mode, the resolved range and where it came from."""
        if not isinstance(self.object_scale, str):
            return f"object crop scale: fixed {list(self.object_scale)}"
        if self.object_scale == "paper" and self.calibration is not None:
            c = self.calibration
            capped = f", capped at {self.object_scale_cap:g}" if c["capped"] else ""
            return (
                f"object crop scale: paper, S_min = {self.scene_scale[0]:g} / {c['mean_area_fraction']:.4f} "
                f"(mean area fraction of the top-{self.topk} usable proposals over {c['images']} images"
                f"{capped}) "
                f"-> [{self.resolved_object_scale[0]:.4f}, {self.resolved_object_scale[1]:g}]"
            )
        note = " (paper mode, not calibrated on proposals yet)" if self.object_scale == "paper" else ""
        return (
            f"object crop scale: per-region lower bound {self.scene_scale[0]:g} x image area / region area, "
            f"at most {self.object_scale_cap:g}{note}"
        )

    def calibrate(self, sizes, boxes_of, count: int) -> ViewPairPolicy:
        """Sets the paper's dataset-level object scale from the proposals this policy draws from.

        ``S_min = scene_scale[0] / f``, where ``f`` is the mean, over images, of the mean area fraction of
        each image's object regions (the usable top-k proposals, grown to ``min_box_size``). That is the
        expected area fraction of the region a sample draws, since a sample picks an image and then one
        of its usable proposals uniformly. ``S_min`` is capped at ``object_scale_cap``; images without
        usable proposals (scene fallbacks) do not count. A no-op unless the mode is ``"paper"`` and the
        policy uses proposals.

        Args:
            sizes: ``sizes(i) -> (width, height)`` of image ``i`` (e.g. ``Records.size``).
            boxes_of: ``boxes_of(i) -> [N, 4]`` proposals of image ``i``, best first.
            count: Number of images; at most 20,000 of them, evenly spaced, are read.

        Returns:
            ``self``, for chaining.
        """
        if self.object_scale != "paper" or not self.uses_proposals or self.calibration is not None:
            return self
        n = int(count)
        picks = np.unique(np.linspace(0, n - 1, min(n, _CALIBRATION_IMAGES)).round().astype(np.int64)) if n else []
        fractions = []
        for i in picks:
            width, height = sizes(int(i))
            regions = self.usable_proposals(boxes_of(int(i)), width, height)
            if len(regions):
                fractions.append(float(B.area(regions).mean()) / (float(width) * float(height)))
        if not fractions:
            self.calibration = {"images": 0, "mean_area_fraction": float("nan"), "capped": False}
            logger.warning("object_scale 'paper': no image has a usable proposal; keeping the per-region rule")
            return self
        mean = float(np.mean(fractions))
        raw = self.scene_scale[0] / max(mean, 1e-12)
        lo = round(min(raw, self.object_scale_cap), 6)  # printable in logs and configs
        self.resolved_object_scale = (lo, 1.0)
        self.calibration = {
            "images": len(fractions),
            "mean_area_fraction": mean,
            "s_min": raw,
            "capped": raw > self.object_scale_cap,
        }
        logger.info(self.describe_object_scale())
        return self

    def usable_proposals(self, proposals, width: float, height: float) -> np.ndarray:
        """The object regions: the first ``topk`` proposals that are finite and, clipped to the image,
        have both sides of at least ``min_proposal_size`` pixels, grown to ``min_box_size`` if set."""
        kept = self._usable(proposals, width, height)
        if self.min_box_size > 0 and len(kept):
            kept = B.expand_to_min_size(kept, self.min_box_size, width, height)
        return kept

    def _usable(self, proposals, width: float, height: float) -> np.ndarray:
        proposals = B.as_boxes(proposals)
        # Stores keep up to ~1000 proposals per image; only the head matters unless it has unusable rows.
        kept = self._clean(proposals[: self.topk], width, height)
        if len(kept) < self.topk and len(proposals) > self.topk:
            kept = self._clean(proposals, width, height)
        return kept[: self.topk]

    def _clean(self, boxes: np.ndarray, width: float, height: float) -> np.ndarray:
        # Same rule as boxes.sanitize, in fewer numpy calls: this runs for every sample.
        clipped = np.clip(boxes, 0, np.array([width, height, width, height], dtype=np.float32))
        m = self.min_proposal_size
        ok = np.isfinite(boxes).all(axis=1)
        ok &= (clipped[:, 2] - clipped[:, 0] >= m) & (clipped[:, 3] - clipped[:, 1] >= m)
        return clipped[ok]

    def _region(self, kind: str, box: np.ndarray, width: float, height: float, rng: np.random.Generator):
        """The region of one view as ``(x1, y1, x2, y2)`` floats.

        Dilation and shift apply to the proposal itself; growing to ``min_box_size`` comes after, as in
        the released code (appendix G): a 100 px box with delta 0.1 in a 1000 px image becomes a 300 px
        region, not 224 + 200 = 424 px.
        """
        region = self._raw_region(kind, box, width, height, rng)
        if kind == "scene" or self.min_box_size <= 0:
            return region
        grown = B.expand_to_min_size(np.array([region], np.float32), self.min_box_size, width, height)[0]
        return tuple(float(v) for v in grown)

    def _raw_region(self, kind: str, box: np.ndarray, width: float, height: float, rng: np.random.Generator):
        if kind == "scene":
            return 0.0, 0.0, float(width), float(height)
        x1, y1, x2, y2 = (float(v) for v in box)
        if kind == "object":
            return x1, y1, x2, y2
        if kind == "dilated":  # each side grows by delta x image size (not x coordinate)
            dx, dy = self.delta * width, self.delta * height
            return max(x1 - dx, 0.0), max(y1 - dy, 0.0), min(x2 + dx, width), min(y2 + dy, height)
        lo, hi = self.shift_radius
        radius = lo + (hi - lo) * rng.random()
        theta = 2 * math.pi * rng.random()
        w, h = min(x2 - x1, width), min(y2 - y1, height)
        nx = min(max(x1 + radius * math.cos(theta), 0.0), width - w)
        ny = min(max(y1 + radius * math.sin(theta), 0.0), height - h)
        return nx, ny, nx + w, ny + h

    def _object_scale(self, region: np.ndarray, width: float, height: float) -> tuple[float, float]:
        if self.resolved_object_scale is not None:
            return self.resolved_object_scale
        region_area = float(region[2] - region[0]) * float(region[3] - region[1])
        lo = min(self.object_scale_cap, self.scene_scale[0] * width * height / max(region_area, 1e-6))
        return (lo, 1.0)

    def sample(self, width: float, height: float, proposals, rng: np.random.Generator) -> ViewPair:
        """Samples the two crop boxes for an image of ``width x height`` with ``proposals``
        (``[N, 4]`` xyxy, best first)."""
        kinds = self.region_kinds
        fallback = False
        box = None
        if self.uses_proposals:
            usable = self._usable(proposals, width, height)
            if len(usable):
                box = usable[rng.integers(len(usable))]
            else:
                kinds, fallback = ("scene", "scene"), True

        regions, crops = [], []
        for kind in kinds:
            region = np.array(self._region(kind, box, width, height, rng), dtype=np.float32)
            if kind == "scene":
                crop = random_resized_crop_box(region, self.scene_scale, self.scene_ratio, rng)
            else:
                crop = random_resized_crop_box(
                    region, self._object_scale(region, width, height), self.object_ratio, rng
                )
            regions.append(region)
            crops.append(crop)

        if self.swap and rng.random() < 0.5:
            regions.reverse()
            crops.reverse()
            kinds = (kinds[1], kinds[0])
        return ViewPair(np.stack(regions), np.stack(crops), tuple(kinds), fallback)


def _scale_pair(label: str, pair) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a pair [lo, hi], got {pair!r}") from None
    if not (0 < lo <= hi <= 1):  # False for NaN too
        raise ValueError(f"{label} must satisfy 0 < lo <= hi <= 1, got {pair}")
    return lo, hi


def make_policy(name: str, **kwargs) -> ViewPairPolicy:
    """Builds a policy by its paper name; keyword arguments go to :class:`ViewPairPolicy`."""
    return ViewPairPolicy(name, **kwargs)
