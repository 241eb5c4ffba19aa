r"""``objcrop linear``: linear probe of a frozen backbone (mAP for multi-label, top-1 for single-label).

    objcrop linear --checkpoint runs/x/checkpoints/ckpt-00001000.pt --format coco \
        --train-annotations scenes/train.json --test-annotations scenes/test.json --images scenes/images --size 128
    objcrop linear --checkpoint random:resnet18 --small-images ...          # the random-init row
    objcrop linear --checkpoint cifar.pth --arch resnet18 --format folder \
        --train-images cifar/train --test-images cifar/test --task single

Also defines the dataset, backbone and run arguments that ``objcrop knn`` and ``objcrop supervised`` share.
"""

from __future__ import annotations

import argparse
import json

from objcrop.data.records import Records

# Both modules import neither torch nor sklearn, so building the parser stays light.
from objcrop.evaluate.linear import DEFAULT_LRS, DEFAULT_WDS, PROTOCOLS
from objcrop.evaluate.metrics import TASKS

# objcrop.evaluate.features.READOUT_MODES, repeated because that module imports torch
# (tests/evaluate/test_commands.py checks they agree).
READOUT_MODES = ("center", "squash")
CACHE_DIR_HELP = "feature cache folder (default: <checkpoint>.features/; ~/.cache/objcrop/features/ for random:)"


def add_split_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--format``, ``--train-annotations``/``--test-annotations`` and ``--images`` (or per-split folders)."""
    from objcrop.data.readers import FORMATS

    parser.add_argument("--format", required=True, choices=FORMATS, help="dataset format")
    parser.add_argument("--train-annotations", help="annotations of the train split (see 'objcrop show --help')")
    parser.add_argument("--test-annotations", help="annotations of the test split")
    parser.add_argument("--images", help="folder of the images of both splits")
    parser.add_argument("--train-images", help="folder of the train images (instead of --images)")
    parser.add_argument("--test-images", help="folder of the test images (instead of --images)")
    parser.add_argument("--labels-csv", help="OpenImages: image-level labels CSV")
    parser.add_argument("--classes-csv", help="OpenImages: class descriptions CSV; YOLO: file of class names")


def split_records_from_args(args: argparse.Namespace) -> tuple[Records, Records]:
    """The train and test :class:`Records` the arguments describe."""
    from objcrop.data.readers import load_records

    splits = []
    for split in ("train", "test"):
        images = getattr(args, f"{split}_images") or args.images
        if images is None:
            raise ValueError(f"give --images (both splits) or --{split}-images")
        splits.append(
            load_records(
                args.format,
                annotations=getattr(args, f"{split}_annotations"),
                images=images,
                labels_csv=args.labels_csv,
                classes_csv=args.classes_csv,
            )
        )
    return splits[0], splits[1]


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--checkpoint``, ``--arch``, ``--small-images`` and ``--seed``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="ckpt-*.pt from 'objcrop pretrain', a torchvision state dict (.pth), or random:<arch>",
    )
    parser.add_argument("--arch", help="architecture of a plain state dict without a .json sidecar, e.g. resnet50")
    parser.add_argument(
        "--small-images",
        action="store_const",
        const=True,
        default=None,
        help="the state dict or random:<arch> has the small-image stem (3x3 conv, no max-pool)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights, splits and batches (default 0)")


def add_run_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Adds ``--device``, ``--threads``, ``--workers``, ``--batch-size``, ``--no-progress`` and ``--json``."""
    parser.add_argument("--device", default="cpu", help="device of the backbone: cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0, help="image-loading processes (default 0)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per step (default {batch_size})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def apply_run_args(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "linear",
        help="linear probe of a frozen backbone: test mAP (multi-label) or top-1 (single-label)",
        description=(
            "Scores a backbone with a linear classifier on its frozen features. The default 'cached' protocol "
            "extracts features once (cached as float16 next to the weights, recomputed when the weights, size or "
            "dataset change), picks lr and weight decay on a seeded validation share of the train split, retrains "
            "on the whole train split and scores test. '--protocol paper' trains through the frozen network on "
            "augmented crops (SGD lr 30, 100 epochs, lr x0.1 at 60/80). Metrics are percentages; mAP is the mean "
            "of the per-class average precisions over the classes with a positive in test."
        ),
    )
    add_backbone_args(p)
    add_split_dataset_args(p)
    p.add_argument("--task", choices=TASKS, default="multi", help="multi-label (mAP) or single-label (top-1)")
    p.add_argument("--size", type=int, default=128, help="read-out side in pixels (default 128)")
    p.add_argument("--mode", choices=READOUT_MODES, default="center", help="read-out geometry (default center)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="cached", help="cached features or the paper's protocol")
    p.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    p.add_argument("--epochs", type=int, default=100, help="epochs of each fit on cached features (default 100)")
    p.add_argument(
        "--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="learning rates to try (%(default)s)"
    )
    p.add_argument("--wds", type=float, nargs="+", default=list(DEFAULT_WDS), help="weight decays to try (%(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="train share held out for the choice (0.2)")
    p.add_argument("--paper-epochs", type=int, default=100, help="epochs of --protocol paper (default 100)")
    add_run_args(p, batch_size=256)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.evaluate.linear import linear_probe

    apply_run_args(args)
    train, test = split_records_from_args(args)
    result = linear_probe(
        args.checkpoint,
        train,
        test,
        task=args.task,
        size=args.size,
        protocol=args.protocol,
        cache_dir=args.cache_dir,
        arch=args.arch,
        small_images=args.small_images,
        seed=args.seed,
        mode=args.mode,
        lrs=args.lrs,
        wds=args.wds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        paper_epochs=args.paper_epochs,
        workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(
        f"{result.metric} {result.value:.2f}% on {result.test_images} test images "
        f"({result.classes_evaluated} classes evaluated, {result.classes_skipped} skipped without a positive; "
        f"chance {result.chance:.2f}%)"
    )
    chosen = f"lr {result.lr:g}, weight decay {result.weight_decay:g}"
    if result.val_value is not None:
        chosen += f" chosen on val ({result.val_value:.2f}%)"
    print(
        f"{result.protocol} protocol at {result.size} px: {chosen}; features {result.seconds_features:.1f} s "
        f"({result.cache_hits} of 2 splits from cache), training {result.seconds_train:.1f} s"
    )
    if result.images_skipped:
        print(f"{result.images_skipped} unreadable images left out")
    return 0
