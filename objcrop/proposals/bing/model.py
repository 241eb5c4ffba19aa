"""The BING model: per colour space an 8x8 linear filter (stage I), the window sizes it scores and one
calibration per size (stage II), plus how detection approximates the filter."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from objcrop.proposals.bing.features import COLOUR_SPACES, RESIZE_MODES, WINDOW
from objcrop.proposals.bing.rescore import Rescorer

__all__ = ["BOX_MODES", "BingFilter", "BingModel", "binarize_weights"]

# How a window's box follows from its map position: "map" scales the 8x8 cells of the resized map back to the image
# (what the filter saw); "nominal" is OpenCV's: the corner at position * (side // 8), the box of the size's own
# width and height clipped to the image (with ``rint`` map sizes the two differ by up to a few pixels).
BOX_MODES = ("map", "nominal")


def binarize_weights(weights: np.ndarray, num_bases: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximates ``weights`` (64 values) by ``sum_j coeffs[j] * a_j`` with ``a_j`` in ``{-1, +1}^64``.

    The paper's greedy Algorithm 1: ``a_j = sign(residual)``, ``coeffs[j] = <a_j, residual> / 64``.

    Returns:
        ``bases`` uint64 ``[num_bases]`` (bit ``63 - k`` set where ``a_j[k] = +1``) and float32 ``coeffs``.
    """
    if not 1 <= num_bases <= 4:
        raise ValueError(f"num_bases must be in 1..4, got {num_bases}")
    residual = np.asarray(weights, dtype=np.float32).reshape(-1).copy()
    if residual.size != WINDOW * WINDOW:
        raise ValueError(f"BING weights must have {WINDOW * WINDOW} values, got {residual.size}")
    place = np.left_shift(np.uint64(1), np.arange(63, -1, -1, dtype=np.uint64))
    bases = np.zeros(num_bases, dtype=np.uint64)
    coeffs = np.zeros(num_bases, dtype=np.float32)
    for j in range(num_bases):
        sign = np.where(residual >= 0, np.float32(1), np.float32(-1))
        coeffs[j] = np.float32(np.dot(residual, sign) / residual.size)
        residual -= coeffs[j] * sign
        bases[j] = np.bitwise_or.reduce(np.where(sign > 0, place, np.uint64(0)))
    return bases, coeffs


@dataclass(frozen=True, eq=False)
class BingFilter:
    """Stage I and II of one colour space.

    Attributes:
        colour_space: ``rgb`` (max over channels), ``hsv`` or ``gray``.
        weights: Float32 ``[8, 8]`` filter on normed gradients in ``[0, 255]``.
        sizes: Int32 ``[S, 2]`` window ``(width, height)`` in pixels that this filter scores.
        calibration: Float32 ``[S, 2]`` ``(slope, intercept)``: a window of size ``i`` with filter response
            ``s`` scores ``slope * s + intercept``.
    """

    colour_space: str
    weights: np.ndarray
    sizes: np.ndarray
    calibration: np.ndarray

    def __post_init__(self) -> None:
        if self.colour_space not in COLOUR_SPACES:
            raise ValueError(f"unknown colour space {self.colour_space!r}; expected one of {COLOUR_SPACES}")
        weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        sizes = np.ascontiguousarray(self.sizes, dtype=np.int32)
        calibration = np.ascontiguousarray(self.calibration, dtype=np.float32)
        if weights.shape != (WINDOW, WINDOW):
            raise ValueError(f"weights must be [8, 8], got {weights.shape}")
        if sizes.ndim != 2 or sizes.shape[1] != 2 or len(sizes) == 0 or (sizes < 1).any():
            raise ValueError(f"sizes must be a non-empty [S, 2] array of positive (width, height), got {sizes.shape}")
        if calibration.shape != sizes.shape:
            raise ValueError(f"calibration must be [S, 2] like sizes {sizes.shape}, got {calibration.shape}")
        if not (np.isfinite(weights).all() and np.isfinite(calibration).all()):
            raise ValueError("BING weights and calibration must be finite")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "calibration", calibration)


@dataclass(frozen=True, eq=False)
class BingModel:
    """A trained BING objectness model.

    Attributes:
        filters: One :class:`BingFilter` per colour space; their windows are merged by calibrated score.
        num_bases: ``Nw``, binary basis vectors approximating each filter.
        num_bits: ``Ng``, top bit planes of the gradient kept by the binarized detector.
        nss: Non-maximum suppression radius in response-map cells (OpenCV: 2, i.e. 5x5).
        resize: How the image is resized for each window size (see ``features.RESIZE_MODES``); a model is
            used with the mode it was trained with.
        rescorer: Optional second ranking of the best windows (see :mod:`.rescore`).
        per_size: Default most windows per window size kept by detection (0: no limit; OpenCV: 250).
        all_positions: Default candidates of detection: every window (OpenCV) rather than the 3x3 local maxima
            of each response map. Suppression then can keep a window beside a suppressed better one.
        boxes: One of :data:`BOX_MODES`.
        info: JSON-compatible notes (training data, parameters, measured recall).
    """

    filters: tuple[BingFilter, ...]
    num_bases: int = 2
    num_bits: int = 4
    nss: int = 2
    resize: str = "pyramid"
    rescorer: Rescorer | None = None
    per_size: int = 0
    all_positions: bool = False
    boxes: str = "map"
    info: dict = field(default_factory=dict)
    # Per image size, what detection precomputes (see detect._plan); not part of the model's value.
    plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        filters = tuple(self.filters)
        if not filters:
            raise ValueError("a BING model needs at least one filter")
        if not 1 <= self.num_bases <= 4:
            raise ValueError(f"num_bases must be in 1..4, got {self.num_bases}")
        if not 1 <= self.num_bits <= 8:
            raise ValueError(f"num_bits must be in 1..8, got {self.num_bits}")
        if self.nss < 0:
            raise ValueError(f"nss must be >= 0, got {self.nss}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.per_size < 0:
            raise ValueError(f"per_size must be >= 0, got {self.per_size}")
        if self.boxes not in BOX_MODES:
            raise ValueError(f"boxes must be one of {BOX_MODES}, got {self.boxes!r}")
        object.__setattr__(self, "filters", filters)

    @property
    def colour_spaces(self) -> tuple[str, ...]:
        """The colour space of each filter, in filter order."""
        return tuple(f.colour_space for f in self.filters)

    @cached_property
    def sizes(self) -> np.ndarray:
        """Int32 ``[U, 2]``: every window size of any filter, sorted (windows of one size share suppression)."""
        return np.unique(np.concatenate([f.sizes for f in self.filters]), axis=0)

    @cached_property
    def binarized(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """``(bases, coeffs)`` of each filter (see :func:`binarize_weights`)."""
        return tuple(binarize_weights(f.weights, self.num_bases) for f in self.filters)

    @cached_property
    def falling_slopes(self) -> np.ndarray:
        """Bool ``[filters, U]``: where a filter's calibration slope for a size is not positive (OpenCV's model has
        two such sizes), so that a better response does not mean a better score."""
        out = np.zeros((len(self.filters), len(self.sizes)), dtype=bool)
        for fi, f in enumerate(self.filters):
            out[fi, self.size_ids(fi)] = f.calibration[:, 0] <= 0
        return out

    def size_ids(self, filter_index: int) -> np.ndarray:
        """Int32 ``[S]``: row of :attr:`sizes` for each size of filter ``filter_index``."""
        sizes = self.sizes
        own = self.filters[filter_index].sizes
        keys = sizes[:, 0].astype(np.int64) << 32 | sizes[:, 1]
        return np.searchsorted(keys, own[:, 0].astype(np.int64) << 32 | own[:, 1]).astype(np.int32)
