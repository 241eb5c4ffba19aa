"""``objcrop synth``: a seeded, procedural multi-object dataset written in COCO format.

The default dataset of the demo, the tests and the laptop-scale benchmark: small objects of
ten classes (:data:`SYNTH_CLASSES`) on cluttered backgrounds, so that random scene crops often
miss the objects. With ``sprites``/``backgrounds`` folders it pastes real object photos onto
crops of real photos instead (either one alone works too).

Layout written to ``out_dir``::

    images/000000.jpg ...   JPEG scenes (file_name in the JSON is relative to images/)
    annotations.json        every image, COCO instances format
    train.json, test.json   a disjoint split by image, same format

Each image entry also carries ``"labels"``: the sorted category ids present in it. Image ``i``
depends only on ``(seed, i)`` and the settings, so the bytes are the same for any ``workers``.

``out_dir`` may already hold a dataset that objcrop synth wrote (its :data:`MARKER_FILE`, or the
``annotations.json`` of an older version): that one is rewritten. Any other folder is refused when
it holds a file with one of the names above, and its other files are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import objcrop
from objcrop import parallel
from objcrop.data.synth_backgrounds import BackgroundBank
from objcrop.data.synth_scene import check_scene_args, render_scene, render_scene_with_areas
from objcrop.data.synth_shapes import SYNTH_CLASSES
from objcrop.data.synth_sprites import SpriteBank
from objcrop.io import write_bytes_atomic, write_json_atomic

__all__ = [
    "MARKER_FILE",
    "SYNTH_CLASSES",
    "image_file_name",
    "render_scene",
    "scene_rng",
    "split_indices",
    "synthesize",
]

log = logging.getLogger(__name__)

MARKER_FILE = ".objcrop-synth"
_DESCRIPTION = "objcrop synth scenes"
_JSON_FILES = ("annotations.json", "train.json", "test.json")


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent streams per image, whatever the worker."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def split_indices(num_images: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test image indices; ``round(num_images * test_fraction)`` go to test."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(num_images)
    num_test = int(round(num_images * test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


@dataclass(frozen=True)
class _SceneWriter:
    """Renders image ``index`` and writes its JPEG; sent once to each worker process."""

    images_dir: str
    seed: int
    scene_kwargs: dict
    jpeg_quality: int
    sprites: SpriteBank | None
    backgrounds: BackgroundBank | None

    def __call__(self, index: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        image, boxes, labels, areas = render_scene_with_areas(
            scene_rng(self.seed, index), sprites=self.sprites, backgrounds=self.backgrounds, **self.scene_kwargs
        )
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]
        )
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for image {index}")
        write_bytes_atomic(os.path.join(self.images_dir, image_file_name(index)), jpeg.tobytes())
        return index, boxes, labels, areas


_worker_writer: _SceneWriter | None = None


def _init_worker(writer: _SceneWriter) -> None:
    global _worker_writer
    _worker_writer = writer


def _work(index: int):
    return _worker_writer(index)


def image_file_name(index: int) -> str:
    """The file name of scene ``index`` (``000042.jpg``)."""
    return f"{index:06d}.jpg"


def _written_by_synth(out: Path) -> bool:
    """True when ``out`` holds synth's marker, or the ``annotations.json`` of a synth run before the marker."""
    if (out / MARKER_FILE).is_file():
        return True
    try:
        info = json.loads((out / "annotations.json").read_text(encoding="utf-8")).get("info", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(info, dict) and info.get("description") == _DESCRIPTION


def claim_out_dir(out: Path, num_images: int) -> None:
    """Creates ``out`` and marks it as synth's, refusing a folder that holds files synth would
    replace but did not write (named in the error)."""
    if out.is_dir() and not _written_by_synth(out):
        images = out / "images"
        existing = set(os.listdir(images)) if images.is_dir() else set()
        clash = [out / name for name in _JSON_FILES if (out / name).exists()]
        clash += [images / image_file_name(i) for i in range(num_images) if image_file_name(i) in existing]
        if clash:
            raise ValueError(
                f"{clash[0]} was not written by objcrop synth ({out} has no {MARKER_FILE} marker) and would be "
                f"replaced ({len(clash)} such file(s)); choose another output folder, or move them away"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER_FILE).is_file():
        write_json_atomic(out / MARKER_FILE, {"written_by": "objcrop", "what": "synth scenes"})


def _coco(indices: np.ndarray, size: int, boxes: list, labels: list, areas: list, class_names, info: dict) -> dict:
    """A COCO instances dict for the images at ``indices`` (COCO image ids are index + 1, category ids label + 1)."""
    images, annotations = [], []
    for i in indices:
        i = int(i)
        category_ids = labels[i].astype(np.int64) + 1
        images.append(
            {
                "id": i + 1,
                "file_name": image_file_name(i),
                "width": size,
                "height": size,
                "labels": sorted({int(c) for c in category_ids}),
            }
        )
        for box, category_id, area in zip(boxes[i], category_ids, areas[i], strict=True):
            x0, y0, x1, y1 = (round(float(v), 2) for v in box)
            annotations.append(
                {
                    "id": 0,
                    "image_id": i + 1,
                    "category_id": int(category_id),
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    for k, ann in enumerate(annotations, start=1):
        ann["id"] = k
    categories = [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(class_names)]
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def synthesize(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    size: int = 128,
    test_fraction: float = 0.2,
    workers: int = 1,
    sprites: str | os.PathLike | None = None,
    backgrounds: str | os.PathLike | None = None,
    min_objects: int = 2,
    max_objects: int = 6,
    min_scale: float = 0.05,
    max_scale: float = 0.25,
    max_occlusion: float = 0.7,
    jpeg_quality: int = 90,
    progress: bool = True,
) -> dict:
    """Writes a scene dataset to ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: Output folder (created); see the module docstring for what may be in it already.
        num_images: How many scenes.
        seed: Seed of the whole dataset; image ``i`` uses a stream derived from ``(seed, i)``.
        size: Side of the square images in pixels.
        test_fraction: Share of the images in ``test.json``.
        workers: Processes rendering in parallel; the output does not depend on it. They start with
            ``forkserver`` (:mod:`objcrop.parallel`), so a script calling this with workers needs an
            ``if __name__ == "__main__":`` guard.
        sprites: Folder of ``<class>/<image>`` object photos to paste instead of procedural objects.
        backgrounds: Folder of photos to crop backgrounds from instead of procedural clutter.
        min_objects: Fewest objects per image.
        max_objects: Most objects per image.
        min_scale: Smallest object box side (the longer one) as a fraction of the image side.
        max_scale: Largest, likewise.
        max_occlusion: Largest hidden share of an object's pixels.
        jpeg_quality: JPEG quality, 1..100.
        progress: Show a progress bar.

    Returns:
        A summary: output paths, image/object counts, per-class object counts, seconds and images per second.

    Raises:
        ValueError: A setting is out of range, or ``out_dir`` holds files objcrop synth did not write
            that it would replace.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    check_scene_args(size, min_objects, max_objects, min_scale, max_scale, max_occlusion)
    train_ids, test_ids = split_indices(num_images, test_fraction, seed)
    sprite_bank = SpriteBank.from_folder(sprites) if sprites is not None else None
    background_bank = BackgroundBank.from_folder(backgrounds) if backgrounds is not None else None
    class_names = sprite_bank.class_names if sprite_bank is not None else SYNTH_CLASSES

    out = Path(out_dir)
    claim_out_dir(out, num_images)
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    scene_kwargs = dict(
        size=size,
        min_objects=min_objects,
        max_objects=max_objects,
        min_scale=min_scale,
        max_scale=max_scale,
        max_occlusion=max_occlusion,
    )
    writer = _SceneWriter(str(images_dir), seed, scene_kwargs, jpeg_quality, sprite_bank, background_bank)

    boxes, labels, areas = [None] * num_images, [None] * num_images, [None] * num_images
    start = time.perf_counter()
    bar = tqdm(total=num_images, unit="img", desc="synth", disable=not progress)
    if workers == 1:
        results = map(writer, range(num_images))
    else:
        results = parallel.imap(
            _work, range(num_images), workers, initializer=_init_worker, initargs=(writer,), chunksize=16, ordered=False
        )
    with bar:
        for index, b, lab, a in results:
            boxes[index], labels[index], areas[index] = b, lab, a
            bar.update()
    seconds = time.perf_counter() - start

    info = {
        "description": _DESCRIPTION,
        "version": objcrop.__version__,
        "seed": seed,
        "size": size,
        **{k: v for k, v in scene_kwargs.items() if k != "size"},
        "sprites": None if sprites is None else str(sprites),
        "backgrounds": None if backgrounds is None else str(backgrounds),
        "boxes": "full (amodal) object extent; area is the visible pixel count",
    }
    for name, ids in (("annotations.json", np.arange(num_images)), ("train.json", train_ids), ("test.json", test_ids)):
        write_json_atomic(out / name, _coco(ids, size, boxes, labels, areas, class_names, info))

    all_labels = np.concatenate(labels)
    per_class = np.bincount(all_labels, minlength=len(class_names))
    summary = {
        "out": str(out),
        "annotations": str(out / "annotations.json"),
        "train": str(out / "train.json"),
        "test": str(out / "test.json"),
        "images": num_images,
        "train_images": len(train_ids),
        "test_images": len(test_ids),
        "objects": int(len(all_labels)),
        "classes": len(class_names),
        "objects_per_class": {name: int(n) for name, n in zip(class_names, per_class, strict=True)},
        "seconds": round(seconds, 3),
        "images_per_second": round(num_images / max(seconds, 1e-9), 1),
    }
    log.debug("wrote %d images, %d objects to %s", num_images, summary["objects"], out)
    return summary
