"""Arguments shared by several subcommands: which dataset, which proposals."""

from __future__ import annotations

import argparse

from objcrop.data.records import Records


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--format``, ``--annotations`` and ``--images``."""
    from objcrop.data.readers import FORMATS

    parser.add_argument("--format", required=True, choices=FORMATS, help="dataset format")
    parser.add_argument(
        "--annotations",
        help="COCO JSON / VOC Annotations folder / OpenImages boxes CSV / YOLO labels folder (not for 'folder')",
    )
    parser.add_argument("--images", required=True, help="folder of the images")
    parser.add_argument("--labels-csv", help="OpenImages: image-level labels CSV")
    parser.add_argument("--classes-csv", help="OpenImages: class descriptions CSV; YOLO: file of class names")


def records_from_args(args: argparse.Namespace) -> Records:
    from objcrop.data.readers import load_records

    return load_records(
        args.format,
        annotations=args.annotations,
        images=args.images,
        labels_csv=getattr(args, "labels_csv", None),
        classes_csv=getattr(args, "classes_csv", None),
    )


def add_proposal_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Adds ``--proposals`` (``gt`` or a proposal store folder)."""
    parser.add_argument(
        "--proposals",
        required=required,
        help="'gt' for ground-truth boxes, or a proposal store folder made by 'objcrop propose'",
    )


def proposals_from_args(args: argparse.Namespace, records: Records):
    from objcrop.proposals import open_proposals

    return open_proposals(args.proposals, records)
