r"""``objcrop analyze recall``: recall of proposal stores against the ground-truth boxes.

Example::

    objcrop analyze recall --format coco --annotations A.json --images DIR \
        --proposals bing_store/ --proposals ss_store/ --plot recall.png
"""

from __future__ import annotations

import argparse
import json

from objcrop.commands._args import add_dataset_args, records_from_args


def add_recall_parser(analyses) -> None:
    """Adds ``recall`` to the sub-subcommands of ``objcrop analyze``."""
    parser = analyses.add_parser(
        "recall",
        help="share of ground-truth boxes found by the top-k proposals (DR-#WIN)",
        description=(
            "For every store, the share of ground-truth boxes that one of the first k proposals of their image "
            "overlaps with IoU >= the threshold (the BING paper's detection rate), pooled over the dataset; "
            "optionally the whole curve against the number of proposals as a PNG."
        ),
    )
    add_dataset_args(parser)
    parser.add_argument(
        "--proposals",
        action="append",
        required=True,
        help="'gt' or a proposal store folder made by 'objcrop propose'; repeat to compare several",
    )
    parser.add_argument(
        "--k", type=int, nargs="+", default=[1, 10, 100, 1000], help="proposal budgets (default 1 10 100 1000)"
    )
    parser.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.7], help="IoU thresholds (default 0.5 0.7)")
    parser.add_argument("--plot", help="write the recall curves (log #proposals) to this PNG")
    parser.add_argument("--plot-iou", type=float, default=0.5, help="IoU threshold of the plotted curves (default 0.5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per store, one per line")
    parser.set_defaults(func=run_recall)


def run_recall(args: argparse.Namespace) -> int:
    from objcrop.analysis.recall import plot_recall_curves, recall_at_k, recall_table
    from objcrop.proposals import open_proposals

    if args.plot:
        from objcrop.analysis.png import check_png_out

        check_png_out(args.plot)  # before the recall, not after it
    ious = list(dict.fromkeys([*args.iou, *([args.plot_iou] if args.plot else [])]))
    records = records_from_args(args)
    results = {}
    for spec in args.proposals:
        store = open_proposals(spec, records)
        results[spec] = result = recall_at_k(records, store, ks=args.k, ious=ious, progress=True)
        if args.json:
            print(json.dumps({"proposals": spec, **result.to_dict()}), flush=True)
    if not args.json:
        print(recall_table(results))
    if args.plot:
        path = plot_recall_curves(results, args.plot, iou=args.plot_iou)
        if not args.json:
            print(f"wrote {path}")
    return 0
