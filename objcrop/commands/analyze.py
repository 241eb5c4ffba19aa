"""``objcrop analyze``: statistics of proposals and view pairs. Each analysis is a sub-subcommand."""

from __future__ import annotations

import argparse
import json
import sys

from objcrop.commands._args import (
    add_dataset_args,
    add_object_scale_args,
    add_proposal_args,
    policy_from_args,
    proposals_from_args,
    records_from_args,
)
from objcrop.commands.analyze_recall import add_recall_parser
from objcrop.crops.policies import POLICIES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="statistics of proposals and view pairs",
        description="Statistics of proposals and view pairs.",
    )
    analyses = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    _register_coverage(analyses)
    add_recall_parser(analyses)


def _register_coverage(analyses) -> None:
    parser = analyses.add_parser(
        "coverage",
        help="share of the overlap of two views that is ground-truth object (paper, appendix D)",
        description=(
            "Samples view pairs with each policy, exactly as training does, and reports the mean share of the "
            "intersection of the two crops covered by the union of the ground-truth boxes, with a 95%% bootstrap "
            "interval over images. Images without ground-truth boxes are skipped and counted."
        ),
    )
    add_dataset_args(parser)
    add_proposal_args(parser)
    parser.add_argument(
        "--policy",
        action="append",
        choices=list(POLICIES),
        help="view-pair policy; repeat for several (default: all)",
    )
    parser.add_argument("--pairs-per-image", type=int, default=50, help="view pairs sampled per image (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the bootstrap")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% interval")
    parser.add_argument("--delta", type=float, default=0.1, help="dilation, as a fraction of the image size")
    add_object_scale_args(parser)
    parser.add_argument("--topk", type=int, default=10, help="object regions come from the first K proposals")
    parser.add_argument(
        "--min-box-size", type=float, default=0.0, help="grow proposals to at least this side in pixels (0: off)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per policy, one per line")
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="also write a result file: every policy's numbers with commit, machine, date and command",
    )
    parser.set_defaults(func=run_coverage)


def run_coverage(args: argparse.Namespace) -> int:
    from objcrop.analysis.coverage import coverage, coverage_table
    from objcrop.commands.analyze_results import check_result_out

    if args.out:
        check_result_out(args.out)  # before the sampling, not after it
    records = records_from_args(args)
    store = proposals_from_args(args, records)
    results = []
    for name in args.policy or list(POLICIES):
        policy = policy_from_args(args, name, records, store)
        if policy.uses_proposals:
            print(f"{name}: {policy.describe_object_scale()}", file=sys.stderr if args.json else sys.stdout)
        result = coverage(
            records,
            store,
            policy,
            pairs_per_image=args.pairs_per_image,
            seed=args.seed,
            bootstrap=args.bootstrap,
            progress=True,
        )
        results.append(result)
        if args.json:
            print(json.dumps(result.to_dict()), flush=True)
    if not args.json:
        print(coverage_table(results))
    if args.out:
        from objcrop.commands.analyze_results import write_result  # checks args.out again

        keys = ("proposals", "pairs_per_image", "seed", "bootstrap", "delta", "topk", "min_box_size")
        settings = {key: getattr(args, key) for key in (*keys, "object_scale", "object_scale_cap")}
        write_result(
            args.out,
            "coverage",
            {"settings": settings, "images": len(records), "results": [r.to_dict() for r in results]},
        )
    return 0
