"""Arguments shared by several subcommands: which dataset, which proposals."""

from __future__ import annotations

import argparse

from objcrop.data.records import Records


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--format``, ``--annotations`` and ``--images``."""
    from objcrop.registry import FORMATS

    parser.add_argument("--format", required=True, choices=FORMATS.names(), help="dataset format")
    parser.add_argument(
        "--annotations",
        help="COCO JSON / VOC Annotations folder / OpenImages boxes CSV / YOLO labels folder (not for 'folder')",
    )
    parser.add_argument(
        "--images",
        required=True,
        help="folder of the images (webdataset: a folder of .tar shards, one shard, or a brace pattern)",
    )
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


def _object_scale(text: str):
    from objcrop.crops.policies import OBJECT_SCALE_MODES

    if text in OBJECT_SCALE_MODES:
        return text
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        modes = ", ".join(OBJECT_SCALE_MODES)
        raise argparse.ArgumentTypeError(f"expected {modes} or LO,HI (e.g. 0.5,1), got {text!r}") from None
    return (lo, hi)


def add_object_scale_args(parser: argparse.ArgumentParser) -> None:
    """``--object-scale`` and ``--object-scale-cap``: how object crops choose their area range."""
    parser.add_argument(
        "--object-scale",
        type=_object_scale,
        default="paper",
        help="object crops' area range: paper (dataset-level S_min, default), per-region, or LO,HI",
    )
    parser.add_argument(
        "--object-scale-cap", type=float, default=0.9, help="largest lower bound of paper/per-region (default 0.9)"
    )


def policy_from_args(args: argparse.Namespace, name: str, records: Records, store):
    """The calibrated :class:`~objcrop.crops.policies.ViewPairPolicy` ``name`` with the command's crop options."""
    from objcrop.crops.policies import ViewPairPolicy

    policy = ViewPairPolicy(
        name,
        delta=args.delta,
        topk=args.topk,
        min_box_size=args.min_box_size,
        object_scale=args.object_scale,
        object_scale_cap=args.object_scale_cap,
    )
    return policy.calibrate(records.size, store.boxes_of, len(records))
