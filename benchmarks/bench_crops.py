"""Throughput of the two-view pipeline: object-aware policies against torchvision's scene crops.

Decodes COCO images (../shared/data/coco128) once into memory, then times, in this one process,
the making of two 224 px MoCo-v2 views per image:

- baseline: ``v2.RandomResizedCrop(224, scale=(0.2, 1))`` + the MoCo-v2 preset, applied twice;
- each policy: :class:`~objcrop.crops.transforms.ViewPairTransform` with GT boxes as proposals
  and the same preset.

In each round every image goes through every pipeline in a shuffled order; the table shows the
median over rounds (images/s counts images, i.e. view pairs) and the median of the per-round
ratio to the baseline of that round, which cancels most of the noise of shared cores. It also compares PIL's Gaussian
blur with torchvision's.

    python benchmarks/bench_crops.py --images 128 --repeats 7 --json benchmarks/results/crops-coco128.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from objcrop.crops.augment import RandomGaussianBlur, moco_v2_view_transform
from objcrop.crops.policies import POLICIES, ViewPairPolicy
from objcrop.crops.transforms import ViewPairTransform
from objcrop.data.coco import read_coco
from objcrop.data.images import load_image
from objcrop.proposals.store import ProposalStore

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"


def load_coco(folder: Path, limit: int):
    """The first ``limit`` images decoded in memory and their GT boxes (largest first)."""
    records = read_coco(folder / "annotations" / "instances_train2017.json", folder / "train2017")
    records = records.subset(np.arange(min(limit, len(records))))
    store = ProposalStore.from_records(records)
    images = [load_image(records.path(i)) for i in tqdm(range(len(records)), desc="decode", leave=False)]
    return images, [store.boxes_of(i) for i in range(len(records))]


BASELINE = "baseline (tv RRC x2)"


def _identity(view):
    return view


def pipelines(size: int, augment: bool = True) -> dict[str, Callable]:
    """Name -> ``(image, proposals) -> two views``; without ``augment`` only the crop stage."""
    augmentation = moco_v2_view_transform() if augment else _identity
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0))
    baseline_view = v2.Compose([crop, augmentation]) if augment else crop
    out: dict[str, Callable] = {BASELINE: lambda image, _: [baseline_view(image), baseline_view(image)]}
    for name in POLICIES:
        out[name] = ViewPairTransform(ViewPairPolicy(name), size=size, view_transforms=augmentation, seed=0)
    return out


def time_pipelines(pipes: dict[str, Callable], images, proposals, repeats: int) -> dict[str, list[float]]:
    """Seconds per round of each pipeline.

    Within a round every image goes through every pipeline, in a new random order per image, so
    that load from other processes hits all pipelines alike.
    """
    order_rng = np.random.default_rng(0)
    names = list(pipes)
    for name in names:  # warm-up
        for image, boxes in zip(images[:4], proposals[:4], strict=True):
            pipes[name](image, boxes)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in tqdm(range(repeats), desc="rounds", leave=False):
        total = dict.fromkeys(names, 0.0)
        for image, boxes in zip(images, proposals, strict=True):
            for k in order_rng.permutation(len(names)):
                start = time.perf_counter()
                pipes[names[k]](image, boxes)
                total[names[k]] += time.perf_counter() - start
        for name in names:
            seconds[name].append(total[name])
    return seconds


def geometry_us(name: str, images, proposals, rng: np.random.Generator, passes: int = 10) -> float:
    """Median over passes of the mean microseconds of ``policy.sample`` alone."""
    policy = ViewPairPolicy(name)
    per_pass = []
    for _ in range(passes):
        start = time.perf_counter()
        for image, boxes in zip(images, proposals, strict=True):
            policy.sample(image.width, image.height, boxes, rng)
        per_pass.append((time.perf_counter() - start) / len(images) * 1e6)
    return statistics.median(per_pass)


def blur_comparison(images, size: int, repeats: int) -> list[tuple[str, float]]:
    """Milliseconds per view of each blur on ``size`` px views (sigma drawn in [0.1, 2])."""
    views = [image.resize((size, size)) for image in images]
    tensors = [v2.functional.pil_to_tensor(view) for view in views]
    kernel = 2 * round(0.05 * size) + 1  # 10% of the view, the MoCo/BYOL torchvision setting (23 at 224)
    candidates = {
        "ours on PIL (PIL ImageFilter.GaussianBlur)": (RandomGaussianBlur(p=1.0), views),
        f"torchvision v2.GaussianBlur({kernel}) on PIL": (v2.GaussianBlur(kernel, (0.1, 2.0)), views),
        "ours on uint8 tensor (kernel 2*ceil(3 sigma)+1)": (RandomGaussianBlur(p=1.0), tensors),
        f"torchvision v2.GaussianBlur({kernel}) on uint8 tensor": (v2.GaussianBlur(kernel, (0.1, 2.0)), tensors),
    }
    rows = []
    for label, (blur, inputs) in candidates.items():
        rounds = []
        for _ in range(repeats):
            start = time.perf_counter()
            for x in inputs:
                blur(x)
            rounds.append((time.perf_counter() - start) / len(inputs) * 1e3)
        rows.append((label, statistics.median(rounds)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="COCO folder (annotations/, train2017/)")
    parser.add_argument("--images", type=int, default=128, help="images per round")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (the median is reported)")
    parser.add_argument("--size", type=int, default=224, help="view side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write a result file (benchmarks/results/)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"COCO folder not found: {args.data}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, proposals = load_coco(args.data, args.images)
    print(f"{len(images)} images from {args.data}, {sum(map(len, proposals))} GT boxes, views {args.size} px")
    rng = np.random.default_rng(0)
    measured: dict[str, list[dict]] = {}
    for augment in (True, False):
        seconds = time_pipelines(pipelines(args.size, augment), images, proposals, args.repeats)
        what = "crop + MoCo-v2 augmentations" if augment else "crop stage only (no augmentations)"
        print(f"\n{what}:")
        print(f"{'pipeline':<22}{'images/s':>10}{'ratio':>8}{'ratio range':>16}{'geometry us':>13}")
        rows = measured["rows" if augment else "crop_only"] = []
        for name, secs in seconds.items():
            ratios = [b / s for b, s in zip(seconds[BASELINE], secs, strict=True)]
            geometry = f"{geometry_us(name, images, proposals, rng):.0f}" if augment and name in POLICIES else ""
            rows.append(
                {
                    "pipeline": name,
                    "img_per_s": len(images) / statistics.median(secs),
                    "ratio": statistics.median(ratios),
                    "ratio_range": [min(ratios), max(ratios)],
                    "geometry_us": float(geometry) if geometry else None,
                }
            )
            print(
                f"{name:<22}{len(images) / statistics.median(secs):>10.1f}{statistics.median(ratios):>8.3f}"
                f"{f'{min(ratios):.3f}-{max(ratios):.3f}':>16}{geometry:>13}"
            )
    print(
        "images/s: median over rounds of two-view samples per second; ratio: median over rounds of "
        "baseline time / pipeline time; geometry us: policy.sample alone"
    )

    print(f"\nGaussian blur per {args.size} px view, sigma in [0.1, 2] (median of {args.repeats} rounds):")
    rows = blur_comparison(images, args.size, args.repeats)
    for label, ms in rows:
        print(f"  {label:<52}{ms:>8.2f} ms  ({ms / rows[0][1]:.1f}x ours on PIL)")
    if args.json:
        from objcrop.commands.analyze_results import write_result

        settings = {"data": str(args.data), "images": len(images), "size": args.size, "repeats": args.repeats}
        blur = [{"what": label, "ms": ms} for label, ms in rows]
        data = {"settings": settings | {"threads": args.threads}, "baseline": BASELINE, **measured, "blur_ms": blur}
        write_result(args.json, "crops", data)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
