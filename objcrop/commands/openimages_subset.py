"""``objcrop openimages-subset``: the paper's OpenImages subset (frequent classes, multi-class images)."""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "openimages-subset",
        help="select the paper's OpenImages subset and print its counts",
        description=(
            "Keeps the classes present in at least --min-class-images images, then the images that hold at least "
            "--min-classes distinct kept classes (the paper: 900 and 2). Presence comes from the boxes CSV and, "
            "with --labels, from positive image-level labels."
        ),
    )
    parser.add_argument("--boxes", required=True, help="OpenImages boxes CSV (ImageID, LabelName, ...)")
    parser.add_argument("--labels", help="OpenImages image-level labels CSV (ImageID, LabelName, Confidence)")
    parser.add_argument("--min-class-images", type=int, default=900, help="images a class needs (default 900)")
    parser.add_argument("--min-classes", type=int, default=2, help="kept classes an image needs (default 2)")
    parser.add_argument(
        "--out",
        help="write the kept ImageIDs here, one per line after a '# objcrop openimages-subset' header line "
        "(an existing file is replaced only if objcrop wrote it)",
    )
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.data.openimages import check_ids_out, openimages_subset

    if args.min_class_images < 1 or args.min_classes < 1:
        raise ValueError("--min-class-images and --min-classes must be >= 1")
    if args.out:
        check_ids_out(args.out)  # before reading the CSVs (minutes for the full OpenImages)
    start = time.perf_counter()
    subset = openimages_subset(
        args.boxes,
        labels_csv=args.labels,
        min_images_per_class=args.min_class_images,
        min_classes_per_image=args.min_classes,
    )
    seconds = time.perf_counter() - start
    if args.out:
        subset.write_image_ids(args.out)
    counts = subset.counts()
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        for key, value in counts.items():
            print(f"{key:28s} {value}")
        rate = subset.boxes_before / seconds if seconds > 0 else float("inf")
        print(f"read {subset.boxes_before} box rows in {seconds:.1f} s ({rate:,.0f} rows/s)")
        if args.out:
            print(f"wrote {subset.images_after} image ids to {args.out}")
    return 0
