"""Cached-feature linear probe against the paper's protocol, on the same backbone and data.

- cached: features extracted once at the read-out size (cold cache: the extraction is timed), then
  a grid of (lr, weight decay) chosen on a val share of train, retrained on all of train, scored on test;
- paper: a linear layer trained through the frozen network on RandomResizedCrop + flip images every
  epoch (SGD lr 30, momentum 0.9, no weight decay, lr x0.1 at 60% and 80% of the epochs), then test.

Goal: cached >= 10x faster at the same test mAP +-0.5. The paper trains 100 epochs; the default here is
scaled down (--paper-epochs) so that it runs in a few minutes on a 2-core CPU; the time of the paper
protocol grows linearly with its epochs, the cached probe's does not. Defaults: synthetic scenes of
128 px (300 train / 100 test, written to a temporary folder unless --data is given), a random-init
ResNet-18 with the small-image stem (or --checkpoint), a 32 px read-out, one thread.

    python benchmarks/bench_linear.py
    python benchmarks/bench_linear.py --checkpoint runs/cpu-tiny/checkpoints/ckpt-00000050.pt --size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.evaluate.linear import linear_probe


def scenes(folder: Path | None, tmp: Path, train: int, test: int, scene_size: int):
    """Train and test records of ``folder`` (made by ``objcrop synth``), or of new scenes written to ``tmp``."""
    if folder is None:
        folder = tmp / "scenes"
        synthesize(folder, train + test, size=scene_size, test_fraction=test / (train + test), progress=False)
    return tuple(
        load_records("coco", annotations=folder / f"{split}.json", images=folder / "images")
        for split in ("train", "test")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="random:resnet18", help="backbone spec (default random:resnet18)")
    p.add_argument("--arch", help="architecture of a plain state dict")
    p.add_argument("--no-small-images", action="store_true", help="random:<arch> with the standard stem")
    p.add_argument("--data", type=Path, help="folder made by 'objcrop synth' (default: new scenes)")
    p.add_argument("--train", type=int, default=300, help="train scenes when generating (default 300)")
    p.add_argument("--test", type=int, default=100, help="test scenes when generating (default 100)")
    p.add_argument("--scene-size", type=int, default=128, help="side of generated scenes (default 128)")
    p.add_argument("--size", type=int, default=32, help="read-out / crop side in pixels (default 32)")
    p.add_argument("--epochs", type=int, default=100, help="epochs of each cached fit (default 100)")
    p.add_argument("--paper-epochs", type=int, default=20, help="epochs of the paper protocol (paper: 100)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step of the paper protocol (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="device of the backbone (default cpu)")
    p.add_argument("--workers", type=int, default=0, help="image-loading processes (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_linear.") as tmp:
        train, test = scenes(args.data, Path(tmp), args.train, args.test, args.scene_size)
        small = (not args.no_small_images) if args.checkpoint.startswith("random:") else None
        common = dict(
            arch=args.arch, small_images=small, size=args.size, device=args.device, workers=args.workers, progress=False
        )
        start = time.perf_counter()
        cached = linear_probe(args.checkpoint, train, test, cache_dir=Path(tmp) / "cache", epochs=args.epochs, **common)
        cached_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = linear_probe(args.checkpoint, train, test, cache_dir=Path(tmp) / "cache", epochs=args.epochs, **common)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        paper = linear_probe(
            args.checkpoint,
            train,
            test,
            protocol="paper",
            paper_epochs=args.paper_epochs,
            batch_size=args.batch_size,
            **common,
        )
        paper_s = time.perf_counter() - start

    ratio = paper_s / cached_s
    gap = cached.value - paper.value
    summary = {
        "backbone": args.checkpoint,
        "train_images": len(train),
        "test_images": len(test),
        "size": args.size,
        "cached_seconds": round(cached_s, 2),
        "cached_features_seconds": round(cached.seconds_features, 2),
        "cached_warm_seconds": round(warm_s, 2),
        "cached_warm_cache_hits": warm.cache_hits,
        "cached_map": round(cached.value, 2),
        "cached_lr": cached.lr,
        "cached_weight_decay": cached.weight_decay,
        "paper_seconds": round(paper_s, 2),
        "paper_epochs": args.paper_epochs,
        "paper_map": round(paper.value, 2),
        "chance_map": round(cached.chance, 2),
        "speedup": round(ratio, 2),
        "speedup_at_100_paper_epochs": round(paper.seconds_train * 100 / args.paper_epochs / cached_s, 1),
        "map_gap": round(gap, 2),
        "goal_met": bool(ratio >= 10 and abs(gap) <= 0.5),
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"{len(train)} train / {len(test)} test images, {args.checkpoint}, read-out {args.size} px, chance "
        f"mAP {cached.chance:.2f}"
    )
    print(
        f"cached : {cached_s:7.1f} s (features {cached.seconds_features:.1f} s; warm cache {warm_s:.1f} s)  "
        f"mAP {cached.value:.2f}  (lr {cached.lr:g}, wd {cached.weight_decay:g})"
    )
    print(f"paper  : {paper_s:7.1f} s ({args.paper_epochs} epochs)  mAP {paper.value:.2f}")
    print(
        f"speed-up {ratio:.1f}x ({summary['speedup_at_100_paper_epochs']}x extrapolated to the paper's 100 epochs), "
        f"mAP gap {gap:+.2f}; goal (>= 10x, |gap| <= 0.5) {'met' if summary['goal_met'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
