"""Evaluation of pretrained backbones: frozen-feature cache, linear probe, kNN, the supervised baseline.

The names below load their module on first use, so importing one submodule (or building the command
line) does not import every evaluation dependency.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BackboneInfo": "backbone",
    "backbone_info": "backbone",
    "load_backbone": "backbone",
    "FeatureCache": "features",
    "cached_features": "features",
    "extract_features": "features",
    "readout_transform": "features",
    "KNNMonitor": "knn",
    "KNNProbeResult": "knn",
    "KNNResult": "knn",
    "knn_evaluate": "knn",
    "knn_probe": "knn",
    "LinearResult": "linear",
    "evaluate_linear": "cached_probe",
    "linear_probe": "linear",
    "train_linear": "cached_probe",
    "mean_average_precision": "metrics",
    "score_predictions": "metrics",
    "top1_accuracy": "metrics",
    "SupervisedResult": "supervised",
    "supervised_baseline": "supervised",
    "train_supervised": "supervised",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
