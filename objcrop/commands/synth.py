"""``objcrop synth``: write the procedural multi-object scene dataset (COCO format).

    objcrop synth --out scenes/ --images 2000 --seed 0
    objcrop synth --out photos/ --images 2000 --sprites cifar10/test --backgrounds coco/train2017

Then read it with ``--format coco --annotations scenes/train.json --images scenes/images``.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a seeded synthetic multi-object scene dataset (COCO format)",
        description=(
            "Renders cluttered square scenes with 2-6 small objects of 10 procedural classes (shape x texture x "
            "colour family) and writes images/*.jpg, annotations.json, train.json and test.json (COCO instances; "
            "boxes are the full object extent). --sprites pastes real object photos (DIR/<class>/*.jpg) instead, "
            "--backgrounds crops real photos for the backgrounds. The same seed and settings give the same bytes."
        ),
    )
    parser.add_argument(
        "--out", required=True, help="output folder: new, or one objcrop synth wrote (others are refused)"
    )
    parser.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of images in test.json (default 0.2)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    parser.add_argument("--sprites", help="folder of object photos, one sub-folder per class")
    parser.add_argument("--backgrounds", help="folder of photos to crop backgrounds from")
    parser.add_argument("--min-objects", type=int, default=2, help="fewest objects per image (default 2)")
    parser.add_argument("--max-objects", type=int, default=6, help="most objects per image (default 6)")
    parser.add_argument(
        "--min-scale", type=float, default=0.05, help="smallest object side / image side (default 0.05)"
    )
    parser.add_argument("--max-scale", type=float, default=0.25, help="largest object side / image side (default 0.25)")
    parser.add_argument(
        "--max-occlusion", type=float, default=0.7, help="largest hidden share of an object (default 0.7)"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.data.synth import synthesize

    summary = synthesize(
        args.out,
        args.images,
        seed=args.seed,
        size=args.size,
        test_fraction=args.test_fraction,
        workers=args.workers,
        sprites=args.sprites,
        backgrounds=args.backgrounds,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        max_occlusion=args.max_occlusion,
        jpeg_quality=args.quality,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"wrote {summary['images']} images ({summary['train_images']} train, {summary['test_images']} test), "
        f"{summary['objects']} objects of {summary['classes']} classes to {summary['out']} "
        f"in {summary['seconds']:.1f} s ({summary['images_per_second']:.0f} img/s)"
    )
    counts = ", ".join(f"{name} {n}" for name, n in summary["objects_per_class"].items())
    print(f"objects per class: {counts}")
    return 0
