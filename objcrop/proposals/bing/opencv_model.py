"""Reads the BING models of OpenCV contrib (``ObjNessB2W8{MAXBGR,HSV,I}.{wS1,wS2,idx}.yml.gz``).

These files are OpenCV FileStorage YAML (``%YAML:1.0`` and ``!!opencv-matrix`` tags, which ``yaml.safe_load``
rejects), so a small parser reads the one matrix each file holds.
"""

from __future__ import annotations

import gzip
import math
import re
from os import PathLike
from pathlib import Path

import numpy as np

from objcrop.proposals.bing.features import WINDOW
from objcrop.proposals.bing.model import BingFilter, BingModel

__all__ = ["OPENCV_COLOUR_NAMES", "read_opencv_matrix", "load_opencv_model"]

OPENCV_COLOUR_NAMES = {"rgb": "MAXBGR", "hsv": "HSV", "gray": "I"}
_DTYPES = {"u": np.uint8, "c": np.int8, "w": np.uint16, "s": np.int16, "i": np.int32, "f": np.float32, "d": np.float64}
_MATRIX = re.compile(
    r"rows:\s*(?P<rows>\d+)\s+cols:\s*(?P<cols>\d+)\s+dt:\s*(?P<dt>\w)\s+data:\s*\[(?P<data>[^\]]*)\]", re.S
)
# OpenCV's BING (and the authors' code) quantizes window sides to base ** t for t in ceil(log_b 10)..ceil(log_b 500).
_MIN_SIDE, _MAX_SIDE = 10.0, 500.0
_PER_SIZE = 250  # computeSaliency's numDetPerSize


def read_opencv_matrix(path: str | PathLike) -> np.ndarray:
    """The single matrix of an OpenCV FileStorage YAML file (``.yml`` or ``.yml.gz``) as a ``[rows, cols]`` array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8", errors="replace")
    if not text.startswith("%YAML"):
        raise ValueError(f"{path}: not an OpenCV FileStorage YAML file")
    match = _MATRIX.search(text)
    if match is None:
        raise ValueError(f"{path}: no opencv-matrix (rows, cols, dt, data) found")
    rows, cols, dt = int(match["rows"]), int(match["cols"]), match["dt"]
    if dt not in _DTYPES:
        raise ValueError(f"{path}: unsupported matrix type {dt!r}")
    values = [v for v in match["data"].replace("\n", " ").split(",") if v.strip()]
    if len(values) != rows * cols:
        raise ValueError(f"{path}: {len(values)} values for a {rows}x{cols} matrix")
    return np.array([float(v) for v in values], dtype=np.float64).astype(_DTYPES[dt]).reshape(rows, cols)


def _sides(base: float) -> tuple[int, int]:
    lo = math.ceil(math.log(_MIN_SIDE) / math.log(base))
    hi = math.ceil(math.log(_MAX_SIDE) / math.log(base))
    return lo, hi - lo + 1


def load_opencv_model(
    folder: str | PathLike, colour_spaces=("rgb", "hsv", "gray"), base: int = 2, nss: int = 2
) -> BingModel:
    """Builds a :class:`BingModel` from OpenCV's trained BING files in ``folder``.

    OpenCV's stage II applies to its binarized score, whose bit planes weigh 1, 2, 4, 8 instead of the
    gradient's 16, 32, 64, 128, so the calibration slopes are divided by 16. OpenCV returns the colour spaces
    one after the other; this model merges them by calibrated score.

    Args:
        folder: Folder holding ``ObjNessB{base}W8{MAXBGR,HSV,I}.{wS1,wS2,idx}.yml.gz``.
        colour_spaces: Which of ``rgb`` (MAXBGR), ``hsv``, ``gray`` (I) to load, in this order.
        base: Window size quantization base in the file names.
        nss: Non-maximum suppression radius (OpenCV uses 2).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"OpenCV BING model folder not found: {folder}")
    min_t, num_t = _sides(base)
    filters = []
    for space in colour_spaces:
        if space not in OPENCV_COLOUR_NAMES:
            raise ValueError(f"unknown colour space {space!r}; expected one of {tuple(OPENCV_COLOUR_NAMES)}")
        stem = folder / f"ObjNessB{base}W{WINDOW}{OPENCV_COLOUR_NAMES[space]}"
        files = {part: Path(f"{stem}.{part}.yml.gz") for part in ("wS1", "wS2", "idx")}
        for part, file in files.items():
            if not file.is_file():
                raise FileNotFoundError(f"OpenCV BING model file missing ({part}): {file}")
        weights = read_opencv_matrix(files["wS1"]).astype(np.float32)
        idx = read_opencv_matrix(files["idx"]).reshape(-1).astype(np.int64)
        stage2 = read_opencv_matrix(files["wS2"]).astype(np.float32)
        if weights.shape != (WINDOW, WINDOW):
            raise ValueError(f"{files['wS1']}: expected an 8x8 filter, got {weights.shape}")
        if stage2.shape != (len(idx), 2):
            raise ValueError(f"{files['wS2']}: expected {len(idx)}x2 calibration, got {stage2.shape}")
        if (idx < 0).any() or (idx >= num_t * num_t).any():
            raise ValueError(f"{files['idx']}: size indices outside 0..{num_t * num_t - 1}")
        sizes = np.stack([base ** (idx % num_t + min_t), base ** (idx // num_t + min_t)], axis=1)
        calibration = np.stack([stage2[:, 0] / 16.0, stage2[:, 1]], axis=1)
        filters.append(BingFilter(space, weights, sizes, calibration))
    info = {"source": "opencv", "folder": str(folder), "base": base}
    # OpenCV's detection: every window is a candidate of its size's greedy suppression, 250 per size, boxes of the
    # nominal size (see docs/bing-opencv.md for what each setting changes).
    return BingModel(
        tuple(filters),
        num_bases=2,
        num_bits=4,
        nss=nss,
        resize="direct",
        per_size=_PER_SIZE,
        all_positions=True,
        boxes="nominal",
        info=info,
    )
