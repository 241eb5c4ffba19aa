"""Shared test factories: tiny records, proposal stores, SSL batches and methods, backend models.

Each factory is a plain function, so that module-level helpers can call it
(``from tests.conftest import make_records``), and a fixture of the same name that returns it. None of
them reads a file it did not write; torch is imported only by the factories that need it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from objcrop.data.records import Record, Records

# Real data for the tests that use it (read-only). OBJCROP_TEST_SHARED_DATA points the tests elsewhere:
# tests/test_shared_data.py points it at a missing folder and checks that every real-data test then skips.
SHARED_DATA = Path(
    os.environ.get("OBJCROP_TEST_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


def shared_data_marks(*relative: str) -> list[pytest.MarkDecorator]:
    """The marks of a test that reads ``SHARED_DATA / r`` for each ``r`` of ``relative``: ``shared_data`` (the
    real-data tests, as tests/test_shared_data.py finds them) and a skip that names what is missing."""
    missing = [str(SHARED_DATA / r) for r in relative if not (SHARED_DATA / r).exists()]
    reason = f"needs {', '.join(missing)} (../shared/data, see its README.md)"
    return [pytest.mark.shared_data, pytest.mark.skipif(bool(missing), reason=reason)]


def needs_shared_data(*relative: str):
    """Decorator form of :func:`shared_data_marks`."""

    def mark(test):
        for one in shared_data_marks(*relative):
            test = one(test)
        return test

    return mark


def make_records(
    boxes_per_image: Sequence,
    size: tuple[int, int] | Sequence[tuple[int, int]] = (100, 100),
    labels: Sequence | None = None,
    class_names: Sequence[str] = ("thing",),
    paths: Sequence[str] | None = None,
    root: str = "",
    first_image_id: int | None = None,
) -> Records:
    """Records of images that need not exist, one per entry of ``boxes_per_image``.

    Args:
        boxes_per_image: Per image, its xyxy pixel boxes (anything that reshapes to ``[n, 4]``, ``[]`` for none).
        size: ``(width, height)`` of every image, or one pair per image.
        labels: Per image, the class index of each box (default 0).
        class_names: The dataset's classes.
        paths: Image paths (default ``0.jpg``, ``1.jpg``, ...).
        root: The dataset root.
        first_image_id: Image ids count up from this (default: the running index).
    """
    n = len(boxes_per_image)
    sizes = [tuple(size)] * n if np.ndim(size) == 1 else [tuple(s) for s in size]
    paths = list(paths) if paths is not None else [f"{i}.jpg" for i in range(n)]
    recs = []
    for i, boxes in enumerate(boxes_per_image):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        box_labels = np.zeros(len(boxes), np.int32) if labels is None else np.asarray(labels[i], np.int32)
        image_id = -1 if first_image_id is None else first_image_id + i
        recs.append(Record(paths[i], *sizes[i], boxes=boxes, box_labels=box_labels, image_id=image_id))
    return Records.from_records(recs, list(class_names), root=root)


def make_store(records: Records, counts: Sequence[int] = (5, 0, 3), seed: int = 0, meta: dict | None = None):
    """A :class:`~objcrop.proposals.store.ProposalStore` of random boxes inside each image of ``records``.

    Args:
        records: The dataset the store is for.
        counts: Proposals per image, repeated over the images (the default has an image without any).
        seed: Seed of the boxes and scores.
        meta: The store's metadata (default ``{"backend": "test", "params": {"k": 1}}``).
    """
    from objcrop.proposals.store import ProposalStore

    rng = np.random.default_rng(seed)
    per_image = [counts[i % len(counts)] for i in range(len(records))]
    offsets = np.concatenate([[0], np.cumsum(per_image)]).astype(np.int64)
    boxes = np.zeros((offsets[-1], 4), np.float32)
    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        w, h = records.size(i)
        xy = rng.uniform(0, [w / 2, h / 2], size=(hi - lo, 2))
        wh = rng.uniform(1, [w / 2, h / 2], size=(hi - lo, 2))
        boxes[lo:hi] = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(size=offsets[-1]).astype(np.float32)
    meta = {"backend": "test", "params": {"k": 1}} if meta is None else meta
    sizes = np.stack([records.widths, records.heights], axis=1)
    return ProposalStore(boxes, scores, offsets, records.keys(), sizes, records.image_ids, meta)


def tiny_batch(size: int = 4, seed: int = 0, px: int = 32) -> dict:
    """A training batch ``{"views": [x1, x2], "kinds": [size, 2]}`` of random ``px``-pixel views and kinds."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(size, 3, px, px, generator=generator) for _ in range(2)]
    kinds = torch.randint(0, 3, (size, 2), generator=generator)
    return {"views": views, "kinds": kinds}


# Small networks for 32 px views, per registered method; a new method needs its line here (a test checks).
TINY_METHODS = {
    "moco": {"dim": 16, "hidden_dim": 32, "queue_size": 64},
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "densecl": {"dim": 16, "hidden_dim": 32, "queue_size": 64},
}


def with_a_third_view(batch: dict) -> dict:
    """``batch`` with its first view once more: a batch that the two-view methods must refuse."""
    import torch

    kinds = batch["kinds"]
    return {"views": [*batch["views"], batch["views"][0]], "kinds": torch.cat([kinds, kinds[:, :1]], dim=1)}


def tiny_method_config(name: str, **kwargs) -> dict:
    """The default pretraining config with a tiny ResNet-18 method ``name`` (small-image stem)."""
    from objcrop.ssl.config import DEFAULTS

    assert name in TINY_METHODS, f"add tiny settings for the new method {name!r} to TINY_METHODS"
    config = copy.deepcopy(DEFAULTS)
    config["method"] = {"name": name, "backbone": "resnet18", "small_images": True, **TINY_METHODS[name], **kwargs}
    return config


def tiny_method(name: str, **kwargs):
    """The registered method ``name`` with tiny networks (see :data:`TINY_METHODS`), built from its config."""
    from objcrop.ssl.base import build_method

    return build_method(tiny_method_config(name, **kwargs))


def tiny_edge_model(path: Path) -> Path:
    """Writes a valid one-tree structured-edge forest for EdgeBoxes to ``path`` and returns ``path``.

    A patch whose centre has a strong gradient votes for an edge at its centre: enough to run the whole
    EdgeBoxes pipeline on clean synthetic images.
    """
    shrunk = 32 // 2
    magnitude_channel = 3  # L, U, V, then the gradient magnitude at full scale
    feature = magnitude_channel * shrunk * shrunk + (shrunk // 2) * shrunk + shrunk // 2
    bins = [x * 16 + y for x in range(6, 10) for y in range(6, 10)]  # the 4 x 4 centre of the 16 x 16 output
    path.write_text(
        "%YAML:1.0\n"
        "options:\n"
        "   numberOfTrees: 1\n   numberOfTreesToEvaluate: 1\n   selfsimilarityGridSize: 5\n   stride: 2\n"
        "   shrinkNumber: 2\n   patchSize: 32\n   patchInnerSize: 16\n   numberOfGradientOrientations: 4\n"
        "   gradientSmoothingRadius: 0\n   regFeatureSmoothingRadius: 2\n   ssFeatureSmoothingRadius: 8\n"
        "   gradientNormalizationRadius: 4\n"
        "childs:\n   - [ 2, 0, 0 ]\n"
        f"featureIds:\n   - [ {feature}, 0, 0 ]\n"
        "thresholds:\n   - [ 0.5, 0., 0. ]\n"
        f"edgeBoundaries:\n   - [ 0, 0, 0, {len(bins)} ]\n"
        f"edgeBins:\n   - [ {', '.join(map(str, bins))} ]\n"
    )
    return path


def tiny_bing_model(seed: int = 0):
    """An untrained BING model (one grey-level filter of random weights, three window sizes): it runs the
    whole detector, which is what contract tests need, without training one."""
    from objcrop.proposals.bing import BingFilter, BingModel

    weights = np.random.default_rng(seed).normal(size=(8, 8)).astype(np.float32)
    sizes = np.array([[16, 16], [32, 16], [32, 32]], np.int32)
    calibration = np.tile(np.array([1.0, 0.0], np.float32), (len(sizes), 1))
    return BingModel((BingFilter("gray", weights, sizes, calibration),))


@pytest.fixture(name="make_records")
def _make_records_fixture():
    """:func:`make_records`."""
    return make_records


@pytest.fixture(name="make_store")
def _make_store_fixture():
    """:func:`make_store`."""
    return make_store


@pytest.fixture(name="tiny_batch")
def _tiny_batch_fixture():
    """:func:`tiny_batch`."""
    return tiny_batch


@pytest.fixture(name="tiny_method")
def _tiny_method_fixture():
    """:func:`tiny_method`."""
    return tiny_method


# ---------------------------------------------------------------------- tiny training runs


def as_overrides(settings: dict) -> list[str]:
    """``settings`` (dotted key -> value) as ``key=value`` overrides, the values written as JSON (YAML reads it)."""
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def run_config(settings: dict) -> dict:
    """The validated training config of the defaults with ``settings`` over them."""
    from objcrop.ssl.config import load_config

    return load_config(None, as_overrides(settings))


def tiny_run_settings(scenes: Path, out: Path, method: str = "moco", **extra) -> dict:
    """Dotted settings of a deterministic fp32 CPU run on ``scenes`` (an ``objcrop synth`` folder):
    ResNet-18 at 32 px, batch 8, 2 epochs (6 steps each on 64 scenes of 40 px)."""
    method_settings = {**TINY_METHODS[method], **({"small_images": True} if method == "densecl" else {})}
    settings = {
        "data.annotations": str(scenes / "train.json"),
        "data.images": str(scenes / "images"),
        "crops.size": 32,
        "method.name": method,
        "method.backbone": "resnet18",
        **{f"method.{k}": v for k, v in method_settings.items()},
        "optim.batch_size": 8,
        "optim.lr_reference_batch": 8,
        "optim.epochs": 2,
        "optim.warmup_epochs": 0.5,
        "train.out": str(out),
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.channels_last": False,
        "train.workers": 0,
        "train.threads": 1,
        "train.deterministic": True,
        "train.checkpoint_every_steps": 2,
        "train.log_every_steps": 1,
        "train.tensorboard": False,
        "train.progress": False,
    }
    settings.update(extra)
    return settings


def write_run_yaml(settings: dict, path: Path) -> Path:
    """Dotted ``section.key`` settings (as :func:`tiny_run_settings` gives) as a nested YAML config file."""
    import yaml

    nested: dict = {}
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(nested), encoding="utf-8")
    return path


@pytest.fixture
def restore_torch_globals():
    """The trainer sets process-wide torch flags; this puts them back after a test that trains."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory) -> Path:
    """64 synthetic scenes of 40 px (51 training images: 6 batches of 8 per epoch), made once per session."""
    from objcrop.data.synth import synthesize

    out = tmp_path_factory.mktemp("tiny_scenes")
    synthesize(out, num_images=64, seed=0, size=40, progress=False)
    return out
