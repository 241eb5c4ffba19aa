r"""``objcrop supervised``: the supervised baseline, the same backbone trained from scratch with labels.

    objcrop supervised --arch resnet18 --small-images --format coco --train-annotations scenes/train.json \
        --test-annotations scenes/test.json --images scenes/images --size 64 --epochs 10 --out runs/sup/r18.pth

Writes a torchvision state dict (with ``fc``) to --out and its architecture to ``<out>.json``; 'objcrop linear
--checkpoint <out>' reads it without --arch.
"""

from __future__ import annotations

import argparse
import json

from objcrop.commands.linear import add_run_args, add_split_dataset_args, apply_run_args, split_records_from_args
from objcrop.evaluate.metrics import TASKS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "supervised",
        help="train the supervised baseline and score it (own head and linear probe)",
        description=(
            "Trains the backbone from scratch on the image-level labels (multi-label BCE or single-label "
            "cross-entropy, Adam lr 1e-3, RandomResizedCrop + flip), saves it as a torchvision state dict with a "
            ".json sidecar, and reports test mAP/top-1 of its own classifier head and of the cached linear probe "
            "on its frozen features (the paper's upper reference row). Metrics are percentages."
        ),
    )
    add_split_dataset_args(p)
    p.add_argument("--out", required=True, help="state dict file to write, e.g. runs/supervised/resnet18.pth")
    p.add_argument("--arch", default="resnet18", help="backbone: resnet18, resnet50, ... (default resnet18)")
    p.add_argument("--small-images", action="store_true", help="small-image stem (3x3 conv, no max-pool)")
    p.add_argument("--task", choices=TASKS, default="multi", help="multi-label (BCE, mAP) or single-label (CE, top-1)")
    p.add_argument("--size", type=int, default=64, help="training crop and read-out side in pixels (default 64)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=[0.2, 1.0],
        metavar=("LO", "HI"),
        help="area share of the RandomResizedCrop (default 0.2 1.0)",
    )
    p.add_argument("--probe-epochs", type=int, default=100, help="epochs of each linear-probe fit (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and augmentations (default 0)")
    add_run_args(p, batch_size=64)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.evaluate.supervised import supervised_baseline

    apply_run_args(args)
    train, test = split_records_from_args(args)
    result = supervised_baseline(
        train,
        test,
        args.out,
        arch=args.arch,
        small_images=args.small_images,
        task=args.task,
        size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        crop_scale=tuple(args.crop_scale),
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        probe={"epochs": args.probe_epochs},
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    linear = result.linear
    print(
        f"trained {result.arch} for {result.epochs} epochs in {result.seconds_train:.1f} s; saved {result.checkpoint}"
    )
    print(f"loss per epoch: {', '.join(f'{x:.4f}' for x in result.losses)}")
    print(
        f"{result.train_unreadable} unreadable training images skipped ({result.dropped_batches} batches with fewer "
        f"than two readable images dropped), {result.test_unreadable} unreadable test images left out"
    )
    print(
        f"test {result.metric}: own head {result.head_value:.2f}%, linear probe {linear['value']:.2f}% "
        f"({result.classes_evaluated} classes evaluated, {result.classes_skipped} skipped; chance {result.chance:.2f}%)"
    )
    return 0
