"""Saving and loading BING models: one ``.npz`` of plain arrays (read with ``allow_pickle=False``) whose
``meta`` entry is UTF-8 JSON. Writes are atomic, and replace only a file that is such a model already."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

import numpy as np

from objcrop.io import atomic_open
from objcrop.proposals.bing.model import BingFilter, BingModel
from objcrop.proposals.bing.rescore import Rescorer

__all__ = ["FORMAT", "check_model_path", "save_model", "load_model", "load_any"]

FORMAT = "objcrop-bing"
VERSION = 1
_RESCORER_ARRAYS = ("priors", "mean", "scale", "weights")


def _meta(model: BingModel) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "colour_spaces": list(model.colour_spaces),
        "num_bases": model.num_bases,
        "num_bits": model.num_bits,
        "nss": model.nss,
        "resize": model.resize,
        "per_size": model.per_size,
        "all_positions": model.all_positions,
        "boxes": model.boxes,
        "rescorer": None
        if model.rescorer is None
        else {"pool": model.rescorer.pool, "bias": float(np.float32(model.rescorer.bias))},
        "info": model.info,
    }


def _is_model_file(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode("utf-8")) if "meta" in data.files else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_model_path(path: str | PathLike) -> Path:
    """``path`` when a model may be written there: absent, or a BING model file objcrop wrote.

    Raises:
        ValueError: ``path`` is a file of something else (it would be replaced).
        IsADirectoryError: ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a model file")
    if path.exists() and not _is_model_file(path):
        raise ValueError(
            f"{path} is not a BING model file objcrop wrote and would be replaced; "
            "choose another --out, or move it away"
        )
    return path


def save_model(model: BingModel, path: str | PathLike) -> Path:
    """Writes ``model`` to ``path`` (conventionally ``*.npz``) atomically; returns the path.

    Raises:
        ValueError: ``path`` holds a file that is not an objcrop BING model (see :func:`check_model_path`).
    """
    path = check_model_path(path)
    arrays = {"meta": np.frombuffer(json.dumps(_meta(model)).encode("utf-8"), dtype=np.uint8)}
    for i, f in enumerate(model.filters):
        arrays[f"filter{i}_weights"] = f.weights
        arrays[f"filter{i}_sizes"] = f.sizes
        arrays[f"filter{i}_calibration"] = f.calibration
    if model.rescorer is not None:
        for name in _RESCORER_ARRAYS:
            arrays[f"rescorer_{name}"] = getattr(model.rescorer, name)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_model(path: str | PathLike) -> BingModel:
    """Reads a model written by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BING model file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a BING model file ({err})") from err
    if "meta" not in arrays:
        raise ValueError(f"{path}: not a BING model file (no 'meta' entry)")
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported model format {meta.get('format')!r} version {meta.get('version')!r}")
    filters = []
    for i, space in enumerate(meta["colour_spaces"]):
        try:
            weights, sizes, cal = (arrays[f"filter{i}_{k}"] for k in ("weights", "sizes", "calibration"))
        except KeyError as err:
            raise ValueError(f"{path}: missing array {err}") from err
        filters.append(BingFilter(space, weights, sizes, cal))
    rescorer = None
    if meta.get("rescorer") is not None:
        try:
            parts = {name: arrays[f"rescorer_{name}"] for name in _RESCORER_ARRAYS}
        except KeyError as err:
            raise ValueError(f"{path}: missing array {err}") from err
        rescorer = Rescorer(pool=int(meta["rescorer"]["pool"]), bias=float(meta["rescorer"]["bias"]), **parts)
    return BingModel(
        tuple(filters),
        num_bases=int(meta["num_bases"]),
        num_bits=int(meta["num_bits"]),
        nss=int(meta["nss"]),
        resize=str(meta["resize"]),
        rescorer=rescorer,
        # Files written before these settings existed used the defaults.
        per_size=int(meta.get("per_size", 0)),
        all_positions=bool(meta.get("all_positions", False)),
        boxes=str(meta.get("boxes", "map")),
        info=meta.get("info", {}),
    )


def load_any(source: str | PathLike) -> BingModel:
    """Loads our ``.npz`` model, or OpenCV's model files when ``source`` is a folder."""
    source = Path(source)
    if source.is_dir():
        from objcrop.proposals.bing.opencv_model import load_opencv_model

        return load_opencv_model(source)
    return load_model(source)
