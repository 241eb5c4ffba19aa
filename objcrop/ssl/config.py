"""Pretraining configuration: YAML files with dotted ``--set key=value`` overrides, checked before training.

A config has five sections. Every key is known in advance, so a typo fails at once with the
offending key's name, before any data is read:

* ``data``: the dataset (``format``, ``annotations``, ``images``, ...) and ``proposals``
  (``gt`` or a store folder);
* ``crops``: the view-pair policy and the view size / augmentation preset; ``augment_on`` is where the views
  are made: ``loader`` (DataLoader workers), ``device`` (batched on the training device, see
  :mod:`objcrop.crops.device_views`) or ``auto`` (device on CUDA, loader on CPU);
  ``object_scale`` is ``paper`` (the dataset-level S_min of the paper, resolved from the proposals when
  the dataset is built), ``per-region`` or a pair ``[lo, hi]``;
* ``method``: ``name`` (``moco``, ``byol``, ``densecl``) plus the keyword arguments of that
  method's constructor (checked against its signature);
* ``optim``: optimizer, learning rate, schedule, batch size, epochs;
* ``train``: devices, precision, workers, checkpoints, logging.

Every value is checked before any work starts, NaN and infinities included (``value < minimum`` is
False for NaN, so each number is checked with :func:`math.isfinite` first); the error names the key.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from objcrop import registry
from objcrop.crops.policies import OBJECT_SCALE_MODES  # numpy only: config stays torch-free
from objcrop.ssl.errors import ConfigError

__all__ = [
    "ConfigError",
    "DEFAULTS",
    "RESUMABLE_KEYS",
    "apply_overrides",
    "build_policy",
    "config_changes",
    "load_config",
    "method_class",
    "validate_config",
]


DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "format": "coco",
        "annotations": None,
        "images": None,
        "labels_csv": None,
        "classes_csv": None,
        "proposals": "gt",
    },
    "crops": {
        "policy": "obj-obj-dilate",
        "delta": 0.1,
        "shift_radius": [80.0, 100.0],
        "topk": 10,
        "scene_scale": [0.2, 1.0],
        "object_scale": "paper",
        "object_scale_cap": 0.9,
        "scene_ratio": [0.75, 1.3333333333333333],
        "object_ratio": None,
        "min_box_size": 0.0,
        "size": 224,
        "augment": "moco-v2",
        "augment_on": "auto",
    },
    "method": {"name": "moco"},
    "optim": {
        "name": "sgd",
        "lr": 0.03,
        "lr_reference_batch": 256,
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "warmup_epochs": 0.0,
        "batch_size": 256,
        "epochs": 200,
        "max_steps": None,
        "final_lr_factor": 0.0,
        "trust_coefficient": 0.001,
    },
    "train": {
        "out": "runs/pretrain",
        "device": "auto",
        "precision": "auto",
        "channels_last": True,
        "workers": 8,
        "seed": 0,
        "deterministic": False,
        "threads": None,
        "checkpoint_every_steps": 1000,
        "keep_last": 3,
        "log_every_steps": 10,
        "tensorboard": True,
        "progress": True,
        "knn_every_epochs": 0,
        "knn_test_annotations": None,
        "knn_size": None,
    },
}

# The extension points' names come from their tables in objcrop.registry; the rest are fixed here.
CHOICES = {
    "data.format": registry.FORMATS.names(),
    "crops.policy": registry.POLICIES.names(),
    "crops.augment": registry.AUGMENTS.names(),
    "crops.augment_on": registry.AUGMENT_ON,
    "method.name": registry.METHODS.names(),
    "optim.name": ("sgd", "lars"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
}


# Values the trainer derives and records in the run's config (e.g. the paper's S_min, resolved from
# the proposals). A config file may carry them (a saved config read back): they are dropped on input,
# never validated, and ignored when a resumed run's config is compared with its checkpoint's.
DERIVED_KEYS = ("crops.object_scale_resolved",)

# Numeric keys: (type, smallest allowed value, null allowed). The largest allowed values are in MAXIMUMS.
# POSITIVE as the smallest value stands for "> 0".
POSITIVE = 1e-12
NUMBERS: dict[str, tuple[type, float, bool]] = {
    "crops.delta": (float, 0, False),
    "crops.topk": (int, 1, False),
    "crops.min_box_size": (float, 0, False),
    "crops.object_scale_cap": (float, POSITIVE, False),
    "crops.size": (int, 1, False),
    "optim.lr": (float, POSITIVE, False),
    "optim.lr_reference_batch": (int, 1, False),
    "optim.weight_decay": (float, 0, False),
    "optim.momentum": (float, 0, False),
    "optim.warmup_epochs": (float, 0, False),
    "optim.batch_size": (int, 1, False),
    "optim.epochs": (int, 1, False),
    "optim.max_steps": (int, 1, True),
    "optim.final_lr_factor": (float, 0, False),
    "optim.trust_coefficient": (float, 0, False),
    "train.workers": (int, 0, False),
    "train.seed": (int, 0, False),
    "train.threads": (int, 1, True),
    "train.checkpoint_every_steps": (int, 1, False),
    "train.keep_last": (int, 1, False),
    "train.log_every_steps": (int, 1, False),
    "train.knn_every_epochs": (int, 0, False),
    "train.knn_size": (int, 1, True),
}
MAXIMUMS: dict[str, float] = {"crops.object_scale_cap": 1.0}

# Pairs [lo, hi]: (smallest lo, largest hi, lo may equal the smallest), all with lo <= hi.
PAIRS: dict[str, tuple[float, float, bool]] = {
    "crops.shift_radius": (0.0, math.inf, True),
    "crops.scene_scale": (0.0, 1.0, False),
    "crops.scene_ratio": (0.0, math.inf, False),
}
OPTIONAL_PAIRS = {"crops.object_ratio": (0.0, math.inf, False)}
FLAGS = ("train.channels_last", "train.deterministic", "train.tensorboard", "train.progress")

# Keys that name files or folders which must exist before training starts.
PATH_KEYS = ("data.annotations", "data.images", "data.labels_csv", "data.classes_csv", "train.knn_test_annotations")


# Keys a resumed run may change; they are applied and logged (see Trainer.resume). Every other key
# must equal the checkpoint's: data.*, crops.* and train.seed decide the sample stream, method.* the
# model, optim.name the optimizer state and optim.batch_size the steps per epoch.
RESUMABLE_KEYS = frozenset(
    {
        "optim.lr",
        "optim.lr_reference_batch",
        "optim.warmup_epochs",
        "optim.final_lr_factor",
        "optim.epochs",
        "optim.max_steps",
        "optim.weight_decay",
        "optim.momentum",
        "optim.trust_coefficient",
        *(f"train.{key}" for key in DEFAULTS["train"] if key != "seed"),
    }
)

# A saved value that the checkpoint's config does not hold (written by an older objcrop).
NOT_RECORDED = "(not recorded)"


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys -> values, through a JSON round trip (as the checkpoint stores them), derived keys
    left out, and the method's unset keyword arguments filled in with their defaults."""
    plain = json.loads(json.dumps(config))
    flat = {f"{section}.{key}": value for section, keys in plain.items() for key, value in keys.items()}
    try:
        params = inspect.signature(method_class(plain["method"]["name"]).__init__).parameters
    except (ConfigError, KeyError):
        params = {}
    for name, param in params.items():
        if name != "self" and param.default is not inspect.Parameter.empty:
            flat.setdefault(f"method.{name}", json.loads(json.dumps(param.default, default=str)))
    return {key: value for key, value in flat.items() if key not in DERIVED_KEYS}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every key whose value differs, sorted by key.

    Derived keys (:data:`DERIVED_KEYS`) are ignored. A key the saved config lacks has the saved value
    :data:`NOT_RECORDED`; a method argument one side leaves unset counts as its default.
    """
    old, new = _flat(saved), _flat(current)
    return [
        (key, old.get(key, NOT_RECORDED), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, NOT_RECORDED) != new.get(key)
    ]


def method_class(name: str):
    """The method class behind ``method.name`` (:data:`objcrop.registry.METHODS`, imported now)."""
    if name in registry.METHODS:
        return registry.METHODS[name]
    raise ConfigError(f"method.name: unknown method {name!r}; choose from {', '.join(CHOICES['method.name'])}")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def build_policy(crops: Mapping[str, Any]):
    """The :class:`~objcrop.crops.policies.ViewPairPolicy` of a config's ``crops`` section (not yet
    calibrated: the dataset resolves the ``paper`` object scale from its proposals)."""
    from objcrop.crops.policies import ViewPairPolicy

    object_scale = crops["object_scale"]
    return ViewPairPolicy(
        crops["policy"],
        delta=crops["delta"],
        shift_radius=tuple(crops["shift_radius"]),
        topk=crops["topk"],
        scene_scale=tuple(crops["scene_scale"]),
        object_scale=object_scale if isinstance(object_scale, str) else tuple(object_scale),
        object_scale_cap=crops["object_scale_cap"],
        scene_ratio=tuple(crops["scene_ratio"]),
        object_ratio=None if crops["object_ratio"] is None else tuple(crops["object_ratio"]),
        min_box_size=crops["min_box_size"],
    )


def _merge(base: dict, update: Mapping, prefix: str) -> dict:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if prefix == "" and key not in DEFAULTS:
            raise ConfigError(f"{key}: unknown config section; sections are {', '.join(DEFAULTS)}")
        if prefix == "":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: must be a mapping of keys, got {type(value).__name__}")
            _merge(base[key], value, f"{key}.")
        elif dotted in DERIVED_KEYS:
            continue  # written by the trainer, never read from a config
        elif dotted.startswith("method.") or key in base:
            base[key] = value
        else:
            raise ConfigError(f"{dotted}: unknown key; known keys in {prefix[:-1]}: {', '.join(base)}")
    return base


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.06")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from err


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Applies ``section.key=value`` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        key, value = _parse_override(item)
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set {key}: keys are section.key, e.g. optim.lr")
        _merge(config, {parts[0]: {parts[1]: value}}, "")
    return config


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict:
    """Reads a YAML config on top of :data:`DEFAULTS`, applies overrides and validates it."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = _yaml(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        _merge(config, loaded, "")
    apply_overrides(config, overrides)
    validate_config(config)
    return config


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pair(config: dict, dotted: str, bounds: tuple[float, float, bool], allow_none: bool = False) -> None:
    """A pair ``[lo, hi]`` of finite numbers with ``minimum <(=) lo <= hi <= maximum``."""
    section, key = dotted.split(".")
    value = config[section][key]
    if value is None and allow_none:
        return
    if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2):
        raise ConfigError(f"{dotted}: expected a pair of numbers [lo, hi], got {value!r}")
    if not all(_finite_number(v) for v in value):
        raise ConfigError(f"{dotted}: expected a pair of finite numbers [lo, hi], got {value!r}")
    minimum, maximum, inclusive = bounds
    lo, hi = value
    if not ((lo >= minimum if inclusive else lo > minimum) and lo <= hi <= maximum):
        rule = f"{minimum:g} {'<=' if inclusive else '<'} lo <= hi" + (f" <= {maximum:g}" if maximum < math.inf else "")
        raise ConfigError(f"{dotted}: expected {rule}, got {value!r}")


def _object_scale(config: dict) -> None:
    value = config["crops"]["object_scale"]
    if isinstance(value, str) or value is None:
        if value not in OBJECT_SCALE_MODES:
            hint = " (null was the old per-region rule: write per-region)" if value is None else ""
            raise ConfigError(
                f"crops.object_scale: {value!r} is not one of {', '.join(OBJECT_SCALE_MODES)} or a pair [lo, hi]{hint}"
            )
        return
    _pair(config, "crops.object_scale", (0.0, 1.0, False))


def validate_config(config: dict) -> None:
    """Raises :class:`ConfigError` naming the first offending key.

    Integer keys given as integral floats (``1e5`` in YAML reads as a float) are stored back as ints.
    """
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        if config[section][key] not in choices:
            raise ConfigError(f"{dotted}: {config[section][key]!r} is not one of {', '.join(choices)}")
    for dotted, bounds in PAIRS.items():
        _pair(config, dotted, bounds)
    for dotted, bounds in OPTIONAL_PAIRS.items():
        _pair(config, dotted, bounds, allow_none=True)
    _object_scale(config)
    for dotted, (kind, minimum, optional) in NUMBERS.items():
        _number(config, dotted, kind, minimum, optional)
    for dotted in FLAGS:
        section, key = dotted.split(".")
        if not isinstance(config[section][key], bool):
            raise ConfigError(f"{dotted}: expected true or false, got {config[section][key]!r}")
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = config[section][key]
        # A webdataset brace pattern (shards/train-{000000..000009}.tar) names no one file: its reader checks each.
        pattern = dotted == "data.images" and config["data"]["format"] == "webdataset" and "{" in str(value)
        if value is not None and not os.path.exists(value) and not pattern:
            raise ConfigError(f"{dotted}: file or folder not found: {value}")
    if config["data"]["images"] is None:
        raise ConfigError("data.images: required (folder of the training images)")
    if config["train"]["knn_every_epochs"] and config["train"]["knn_test_annotations"] is None:
        raise ConfigError("train.knn_test_annotations: required when train.knn_every_epochs > 0 (the test split)")
    proposals = config["data"]["proposals"]
    if proposals != "gt" and not os.path.isdir(str(proposals)):
        raise ConfigError(f"data.proposals: expected 'gt' or a proposal store folder, not found: {proposals}")
    if config["train"]["precision"] == "fp16" and not _trains_on_cuda(config["train"]["device"]):
        # The one check of this: the trainer's device is the one init_distributed picks from train.device.
        raise ConfigError("train.precision: fp16 needs a GPU; use bf16 or fp32 with train.device cpu")
    if config["crops"]["augment_on"] == "device" and config["data"]["format"] == "webdataset":
        raise ConfigError("crops.augment_on: streamed webdataset shards make views in the loader; use loader or auto")
    try:
        build_policy(config["crops"])
    except ValueError as err:
        raise ConfigError(f"crops: {err}") from err
    _check_method(config["method"])
    try:  # a ViT's patches must tile the views
        from objcrop.ssl.backbones import check_view_size

        check_view_size(config["method"].get("backbone", ""), config["crops"]["size"])
    except ValueError as err:
        raise ConfigError(f"crops.size: {err}") from err


def _trains_on_cuda(device: str) -> bool:
    """Whether ``train.device`` trains on a GPU (``auto``: when CUDA is available)."""
    if device != "auto":
        return device == "cuda"
    import torch

    return torch.cuda.is_available()


def _number(config: dict, dotted: str, kind: type, minimum: float, optional: bool) -> None:
    """A finite number (an integer for ``kind`` int) in ``[minimum, MAXIMUMS.get(dotted, inf)]``.

    Positive quantities use :data:`POSITIVE` as their minimum.
    """
    section, key = dotted.split(".")
    value = config[section][key]
    if value is None and optional:
        return
    maximum = MAXIMUMS.get(dotted, math.inf)
    # NaN fails every comparison, so finiteness is checked first, explicitly; int(inf) would raise OverflowError.
    ok = _finite_number(value) and (kind is float or float(value).is_integer()) and minimum <= value <= maximum
    if not ok:
        what = "an integer" if kind is int else "a finite number"
        bounds = ("> 0" if minimum == POSITIVE else f">= {minimum:g}") + (
            f" and <= {maximum:g}" if maximum < math.inf else ""
        )
        raise ConfigError(f"{dotted}: expected {what} {bounds}{' or null' if optional else ''}, got {value!r}")
    if kind is int:
        config[section][key] = int(value)


def _non_finite(value: Any) -> bool:
    """True when ``value`` is, or (in a list or mapping) holds, a NaN or infinite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return any(_non_finite(v) for v in value)
    return False


def _build_on_meta(cls, kwargs: Mapping[str, Any]) -> Exception | None:
    """Builds ``cls(**kwargs)`` on the meta device (no memory, no compute); returns the error, if any."""
    import torch

    try:
        with torch.device("meta"):
            cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        return err
    return None


def _check_method(method: Mapping[str, Any]) -> None:
    """Checks the method's keyword arguments against its signature, then builds it on the meta
    device so that bad values fail now rather than after the data is read. When the build fails,
    each argument is tried alone to name the offending key."""
    kwargs = dict(method)
    cls = method_class(kwargs.pop("name"))
    params = inspect.signature(cls.__init__).parameters
    for key, value in kwargs.items():
        if key not in params or key == "self":
            known = ", ".join(p for p in params if p != "self")
            raise ConfigError(f"method.{key}: not a parameter of {cls.__name__}; known: {known}")
        if _non_finite(value):
            raise ConfigError(f"method.{key}: NaN and infinite values are not allowed, got {value!r}")
    err = _build_on_meta(cls, kwargs)
    if err is None:
        return
    alone = {key: _build_on_meta(cls, {key: value}) for key, value in kwargs.items()}
    culprits = [key for key, failure in alone.items() if failure is not None]
    if len(culprits) == 1:
        key = culprits[0]
        raise ConfigError(f"method.{key}: {cls.__name__}({key}={kwargs[key]!r}): {alone[key]}") from err
    raise ConfigError(f"method: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {err}") from err
