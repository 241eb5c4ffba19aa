"""Speed and recall of BING proposals on COCO: our BING against OpenCV's BING, in one process.

Our BING is trained on the COCO images of ../shared/data that are not in coco128 (coco_mini train2017,
the annotated coco_mini val2017 images and coco_tiny; a file name seen twice counts once, and every
coco128 file name is left out), then every method runs on the decoded coco128 images:

- time: decoding excluded, one thread (OpenCV with ``cv2.setNumThreads(1)``; the numba kernels are serial).
  In each round every image goes through every method in a shuffled order, so that load from other
  processes hits all methods alike; ms/img is the median over rounds of the mean time per image,
  ms@640x480 the same over the 640x480 images only, and "x OpenCV" the median of the per-round speed
  ratio to OpenCV's BING (which cancels most of the noise of shared cores).
- recall: R@k at IoU 0.5 is the share of non-crowd GT boxes that one of an image's first k proposals
  covers (:func:`objcrop.analysis.recall.first_hit_ranks`).

Rows: OpenCV's own BING; our detector with OpenCV's VOC model (its MAXBGR filter, and all three colour
spaces merged by calibrated score); our BING trained here (default: rgb, box-filtered pyramid resize,
binarized filter; then the same with OpenCV's direct bilinear resize, with the exact float filter, with
three colour spaces, and with the learned rescorer of :mod:`objcrop.proposals.bing.rescore`).

OpenCV's BING (``cv2.saliency.ObjectnessBING``, the contrib VOC model) prints a line and writes a file per
call, so it runs with the working directory in a temporary folder and file descriptor 1 sent to /dev/null;
its boxes are taken in the order it returns them (its three colour spaces one after the other).

    python benchmarks/bench_proposals.py --rounds 3 --models-dir /tmp/bing_models \
        --json benchmarks/results/proposals-coco128.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from objcrop.analysis.recall import first_hit_ranks
from objcrop.data.readers import load_records
from objcrop.data.records import Records
from objcrop.proposals.bing import (
    BingProposer,
    TrainConfig,
    load_model,
    load_opencv_model,
    save_model,
    train_bing,
)
from objcrop.proposals.bing.train import load_rgb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OPENCV_MODEL = DATA / "bing_objectness_model" / "ObjectnessTrainedModel"
TRAIN_SETS = [
    ("coco_mini/annotations/instances_train2017.json", "coco_mini/train2017"),
    ("coco_mini/annotations/instances_val2017.json", "coco_mini/val2017"),
    ("coco_tiny/annotations/instances_train2017.json", "coco_tiny/train2017"),
]
KS = (1, 10, 100, 1000)
OPENCV = "OpenCV BING (cv2.saliency, VOC model)"


def coco128() -> Records:
    return load_records(
        "coco", annotations=DATA / "coco128/annotations/instances_train2017.json", images=DATA / "coco128/train2017"
    )


def training_records(exclude: set[str]) -> Records:
    """The annotated COCO images of :data:`TRAIN_SETS`, each file name once, none of ``exclude``."""
    recs, seen, names = [], set(), ()
    for annotation_file, image_dir in TRAIN_SETS:
        part = load_records("coco", annotations=DATA / annotation_file, images=DATA / image_dir)
        names = part.class_names
        for i in range(len(part)):
            name = os.path.basename(part.key(i))
            if name in seen or name in exclude or len(part.boxes_of(i)) == 0:
                continue
            seen.add(name)
            rec = part[i]
            rec.path = part.path(i)
            recs.append(rec)
    return Records.from_records(recs, names, root="")


class OpenCVBing:
    """``cv2.saliency.ObjectnessBING`` as a proposer, its per-call printing and file writing silenced."""

    def __init__(self, model_dir: Path) -> None:
        self.workdir = tempfile.TemporaryDirectory(prefix="opencv_bing_")
        self.bing = cv2.saliency.ObjectnessBING_create()
        self.bing.setTrainingPath(str(model_dir))
        self.bing.setBBResDir(self.workdir.name)

    @contextlib.contextmanager
    def _silenced(self):
        cwd = os.getcwd()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.chdir(self.workdir.name)
            os.dup2(devnull, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
            os.chdir(cwd)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._silenced():
            ok, boxes = self.bing.computeSaliency(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok or boxes is None:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        b[:, :2] -= 1  # OpenCV reports 1-based left/top
        return b, -np.arange(len(b), dtype=np.float32)


def trained(models_dir: Path | None, name: str, records: Records, spaces, config: TrainConfig, workers: int):
    """Our BING trained on ``records``; cached in ``models_dir`` when given."""
    path = models_dir / f"{name}.npz" if models_dir else None
    if path is not None and path.is_file():
        return load_model(path)
    start = time.perf_counter()
    model = train_bing(records, spaces, config, workers=workers, progress=True)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s")
    if path is not None:
        save_model(model, path)
    return model


def recall(method: Callable, images: list[np.ndarray], records: Records) -> np.ndarray:
    """R@k for :data:`KS` at IoU 0.5 from each image's first 1000 proposals."""
    ranks = []
    for i, image in enumerate(images):
        boxes, _ = method(image)
        ranks.append(first_hit_ranks(records.boxes_of(i), boxes[: max(KS)], [0.5])[0])
    first = np.concatenate(ranks)
    return np.array([(first < k).mean() for k in KS])


def time_methods(methods: dict[str, Callable], images: list[np.ndarray], rounds: int) -> dict[str, np.ndarray]:
    """Seconds per image, ``[rounds, images]`` per method; each image goes through every method in shuffled order."""
    rng = np.random.default_rng(0)
    names = list(methods)
    for name in names:  # warm-up: numba compiles or loads its cache, buffers grow to size
        for image in images[:3]:
            methods[name](image)
    seconds = {name: np.zeros((rounds, len(images))) for name in names}
    for r in tqdm(range(rounds), desc="timing rounds"):
        for i, image in enumerate(images):
            for j in rng.permutation(len(names)):
                start = time.perf_counter()
                methods[names[j]](image)
                seconds[names[j]][r, i] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds over all images (default 3)")
    parser.add_argument("--models-dir", type=Path, help="cache of trained models (trained when missing)")
    parser.add_argument("--workers", type=int, default=1, help="training processes (default 1)")
    parser.add_argument("--topk", type=int, default=1000)
    parser.add_argument("--skip-opencv", action="store_true", help="leave OpenCV's own BING out")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write a result file (benchmarks/results/)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cv2.setNumThreads(1)
    if args.models_dir:
        args.models_dir.mkdir(parents=True, exist_ok=True)

    test = coco128()
    train = training_records({os.path.basename(test.key(i)) for i in range(len(test))})
    print(f"train: {train}\ntest:  {test}")
    images = [load_rgb(test.path(i)) for i in tqdm(range(len(test)), desc="decode coco128")]
    sizes = np.array([im.shape[:2] for im in images])
    mean_w, mean_h, megapixels = sizes[:, 1].mean(), sizes[:, 0].mean(), sizes.prod(1).mean() / 1e6
    print(f"test images: mean {mean_w:.0f}x{mean_h:.0f} px, {megapixels:.3f} MP")

    config = TrainConfig()
    ours_rgb = trained(args.models_dir, "bing_rgb", train, ("rgb",), config, args.workers)
    ours_3 = trained(args.models_dir, "bing_rgb_hsv_gray", train, ("rgb", "hsv", "gray"), config, args.workers)
    ours_direct = trained(
        args.models_dir, "bing_rgb_direct", train, ("rgb",), dataclasses.replace(config, resize="direct"), args.workers
    )
    ours_rescored = trained(
        args.models_dir, "bing_rgb_rescore", train, ("rgb",), dataclasses.replace(config, rescore=True), args.workers
    )
    voc_rgb = load_opencv_model(OPENCV_MODEL, colour_spaces=("rgb",))
    voc_3 = load_opencv_model(OPENCV_MODEL)
    k = args.topk
    methods: dict[str, Callable] = {}
    if not args.skip_opencv:
        methods[OPENCV] = OpenCVBing(OPENCV_MODEL)
    methods |= {
        "ours, OpenCV's VOC model, MAXBGR": BingProposer(voc_rgb, k),
        "ours, OpenCV's VOC model, 3 colour spaces": BingProposer(voc_3, k),
        "ours, COCO-trained, rgb, direct resize": BingProposer(ours_direct, k),
        "ours, COCO-trained, rgb (default)": BingProposer(ours_rgb, k),
        "ours, COCO-trained, rgb, float filter": BingProposer(ours_rgb, k, binarized=False),
        "ours, COCO-trained, rgb+hsv+gray": BingProposer(ours_3, k),
        "ours, COCO-trained, rgb + rescorer": BingProposer(ours_rescored, k),
    }
    recalls = {name: recall(m, images, test) for name, m in tqdm(methods.items(), desc="recall")}
    seconds = time_methods(methods, images, args.rounds)

    vga = np.array([im.shape[:2] == (480, 640) for im in images])
    reference = seconds.get(OPENCV)
    width = max(len(n) for n in methods)
    head = f"{'method':<{width}}  {'ms/img':>7}  {'img/s':>7}  {'x OpenCV':>8}  {'ms@640x480':>10}  " + "  ".join(
        f"R@{k:<5}" for k in KS
    )
    print(f"\n{len(images)} coco128 images ({vga.sum()} of 640x480), {test.boxes.shape[0]} GT boxes, IoU 0.5, top {k}")
    print("one thread; ms: median over rounds of the mean over images\n")
    print(head)
    print("-" * len(head))
    rows = []
    for name in methods:
        per_round = seconds[name].mean(axis=1)
        ms = float(np.median(per_round)) * 1000
        ms_vga = float(np.median(seconds[name][:, vga].mean(axis=1))) * 1000 if vga.any() else float("nan")
        ratio = f"{np.median(reference.mean(axis=1) / per_round):8.1f}" if reference is not None else f"{'-':>8}"
        rec = "  ".join(f"{r:<7.3f}" for r in recalls[name])
        print(f"{name:<{width}}  {ms:7.2f}  {1000 / ms:7.0f}  {ratio}  {ms_vga:10.2f}  {rec}")
        x_opencv = float(np.median(reference.mean(axis=1) / per_round)) if reference is not None else None
        recall_at = {str(k): float(r) for k, r in zip(KS, recalls[name], strict=True)}
        rows.append({"method": name, "ms": ms, "ms_640x480": ms_vga, "x_opencv": x_opencv, "recall": recall_at})
    if args.json:
        from objcrop.commands.analyze_results import write_result

        settings = {"rounds": args.rounds, "topk": k, "iou": 0.5, "threads": 1, "test_images": len(images)}
        settings |= {"test_boxes": int(test.boxes.shape[0]), "train_images": len(train)}
        data = {"settings": settings, "ks": list(KS), "default": "ours, COCO-trained, rgb (default)", "rows": rows}
        write_result(args.json, "proposals", data)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
