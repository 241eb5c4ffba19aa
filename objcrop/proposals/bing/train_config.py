"""Training parameters of BING (:func:`objcrop.proposals.bing.train.train_bing`), validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from objcrop.proposals.bing.features import RESIZE_MODES

__all__ = ["SVM_SOLVERS", "TrainConfig"]

SVM_SOLVERS = ("primal", "dual")


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters.

    Attributes:
        side_lengths: Window sides; every (width, height) pair is a window size (see ``features.size_grid``).
        min_boxes_per_size: A size is kept when at least this many GT boxes fit it (IoU >= ``positive_iou``).
        positive_iou: Overlap that makes a window cover a box (stage I positives, stage II labels).
        negatives_per_image: Random windows overlapping no box, per image (stage I).
        svm_c: ``C`` of the stage-I linear SVM.
        svm_solver: How the stage-I SVM (squared hinge loss, L2 penalty) is solved: ``"primal"`` (liblinear's
            trust-region Newton method, cost linear in the samples, a few passes) or ``"dual"`` (coordinate
            descent on the dual, ``max_iter=20000``: objcrop's earlier solver, same optimum, slower by orders
            of magnitude once samples far outnumber the 64 features).
        max_positives: At most this many stage-I positives before mirroring (``None``: all), a seeded uniform
            sample of them.
        max_negatives: At most this many stage-I negatives (``None``: all): each image gives
            ``min(negatives_per_image, ceil(max_negatives / images))``, then a seeded uniform sample is kept.
        calibration_windows: Best windows per size and image that stage II calibrates on.
        max_calibration_windows: At most this many stage-II windows per filter and window size (``None``: all),
            a seeded uniform sample of the best windows of all images.
        max_rescore_windows: At most this many windows the rescorer is fitted on (``None``: all).
        size_groups: Boundaries on ``sqrt(w * h)`` splitting the sizes into groups with a stage-I filter each
            (empty: one filter for all sizes, as in the paper).
        rescore: Also learn a :class:`~objcrop.proposals.bing.rescore.Rescorer`.
        rescore_pool: BING windows per image that the rescorer reranks.
        num_priors: Data-driven prior boxes the rescorer adds.
        num_bases: ``Nw``, binary basis vectors per filter at detection.
        num_bits: ``Ng``, gradient bit planes at detection.
        nss: Non-maximum suppression radius in response-map cells.
        resize: Resize mode (``features.RESIZE_MODES``).
        seed: Seed of the negative windows and the SVM.
    """

    side_lengths: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    min_boxes_per_size: int = 5
    positive_iou: float = 0.5
    negatives_per_image: int = 100
    svm_c: float = 1.0
    svm_solver: str = "primal"
    max_positives: int | None = 100_000
    max_negatives: int | None = 200_000
    calibration_windows: int = 100
    max_calibration_windows: int | None = 50_000
    max_rescore_windows: int | None = 500_000
    size_groups: tuple[float, ...] = ()
    rescore: bool = False
    rescore_pool: int = 1000
    num_priors: int = 200
    num_bases: int = 2
    num_bits: int = 4
    nss: int = 2
    resize: str = "pyramid"
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, before any image is read: a bad value fails in a second, not after the features.
        ints = {
            "min_boxes_per_size": 1, "negatives_per_image": 1, "calibration_windows": 1, "rescore_pool": 1,
            "num_priors": 0, "num_bases": 1, "num_bits": 1, "nss": 0, "seed": 0,
        }  # fmt: skip
        for name, low in ints.items():
            _check_int(name, getattr(self, name), low)
        for name in ("max_positives", "max_negatives", "max_calibration_windows", "max_rescore_windows"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if not self.side_lengths:
            raise ValueError("side_lengths must not be empty")
        for side in self.side_lengths:
            _check_int("side_lengths", side, 1)
        if not (isinstance(self.positive_iou, Real) and 0 < self.positive_iou <= 1):
            raise ValueError(f"positive_iou must be in (0, 1], got {self.positive_iou!r}")
        if not (isinstance(self.svm_c, Real) and math.isfinite(self.svm_c) and self.svm_c > 0):
            raise ValueError(f"svm_c must be a finite number > 0, got {self.svm_c!r}")
        if not all(isinstance(g, Real) and math.isfinite(g) for g in self.size_groups):
            raise ValueError(f"size_groups must be finite numbers, got {self.size_groups!r}")
        if self.svm_solver not in SVM_SOLVERS:
            raise ValueError(f"svm_solver must be one of {SVM_SOLVERS}, got {self.svm_solver!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
