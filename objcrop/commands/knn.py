r"""``objcrop knn``: weighted k-nearest-neighbour evaluation of a frozen backbone (a quick check).

Example::

    objcrop knn --checkpoint runs/x/checkpoints/ckpt-00001000.pt --format coco \
        --train-annotations scenes/train.json --test-annotations scenes/test.json --images scenes/images
"""

from __future__ import annotations

import argparse
import json

from objcrop.commands.linear import (
    CACHE_DIR_HELP,
    READOUT_MODES,
    add_backbone_args,
    add_run_args,
    add_split_dataset_args,
    apply_run_args,
    split_records_from_args,
)
from objcrop.evaluate.metrics import TASKS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "knn",
        help="weighted kNN of frozen features: test mAP (multi-label) or top-1 (single-label)",
        description=(
            "Cosine kNN on frozen features (shared cache with 'objcrop linear'): each of the k nearest train "
            "images votes for its labels with weight exp(sim / T). Multi-label: the class votes rank the test "
            "images and give mAP; single-label: top-1. Metrics are percentages."
        ),
    )
    add_backbone_args(p)
    add_split_dataset_args(p)
    p.add_argument("--task", choices=TASKS, default="multi", help="multi-label (mAP) or single-label (top-1)")
    p.add_argument("--size", type=int, default=128, help="read-out side in pixels (default 128)")
    p.add_argument("--mode", choices=READOUT_MODES, default="center", help="read-out geometry (default center)")
    p.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    p.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbour counts (default 20 200)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the weights exp(sim / T) (default 0.07)")
    add_run_args(p, batch_size=64)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.evaluate.knn import knn_probe

    apply_run_args(args)
    train, test = split_records_from_args(args)
    result = knn_probe(
        args.checkpoint,
        train,
        test,
        task=args.task,
        size=args.size,
        cache_dir=args.cache_dir,
        arch=args.arch,
        small_images=args.small_images,
        seed=args.seed,
        mode=args.mode,
        k=args.k,
        temperature=args.temperature,
        feature_batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result.to_dict()))  # the first k is the headline, as 'objcrop linear --json'
        return 0
    for r in result.results:
        print(
            f"k={r.k}: {r.metric} {r.value:.2f}% ({r.classes_evaluated} classes evaluated, "
            f"{r.classes_skipped} skipped without a positive; T={r.temperature:g})"
        )
    return 0
