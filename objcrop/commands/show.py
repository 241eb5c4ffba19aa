"""``objcrop show``: pictures of the view pairs a policy samples (like the paper's figures 8-13)."""

from __future__ import annotations

import argparse

import numpy as np

from objcrop.commands._args import (
    add_dataset_args,
    add_object_scale_args,
    add_proposal_args,
    policy_from_args,
    proposals_from_args,
    records_from_args,
)
from objcrop.crops.policies import POLICIES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "show",
        help="draw sampled view pairs of some images to a PNG",
        description=(
            "Draws, for each chosen image, its top-k proposals and sampled view pairs of each policy: both crop "
            "boxes, the regions they were sampled in, and the two views (geometry only, no colour augmentation)."
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
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--image-index", type=int, action="append", help="image to draw; repeatable (default: 0)")
    which.add_argument("--random", type=int, metavar="N", help="draw N images chosen at random (with --seed)")
    parser.add_argument("--pairs", type=int, default=4, help="view pairs per policy (default 4)")
    parser.add_argument("--topk", type=int, default=10, help="object regions come from the first K proposals")
    parser.add_argument(
        "--min-box-size", type=float, default=0.0, help="grow proposals to at least this side in pixels (0: off)"
    )
    parser.add_argument("--delta", type=float, default=0.1, help="dilation, as a fraction of the image size")
    add_object_scale_args(parser)
    parser.add_argument("--view-size", type=int, default=112, help="side in pixels of the drawn views")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice and of the sampling")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.analysis.pictures import draw_records, save_figure
    from objcrop.analysis.png import check_png_out

    check_png_out(args.out)  # before the drawing; save_figure checks again
    records = records_from_args(args)
    store = proposals_from_args(args, records)
    if args.random is not None:
        if args.random < 1:
            raise ValueError(f"--random must be >= 1, got {args.random}")
        rng = np.random.default_rng(args.seed)
        indices = rng.choice(len(records), size=min(args.random, len(records)), replace=False).tolist()
    else:
        indices = args.image_index or [0]
    policies = [policy_from_args(args, name, records, store) for name in args.policy or list(POLICIES)]
    for policy in policies:
        if policy.uses_proposals:
            print(f"{policy.name}: {policy.describe_object_scale()}")
    fig = draw_records(records, store, indices, policies, args.pairs, args.seed, args.topk, args.view_size)
    path = save_figure(fig, args.out, dpi=args.dpi)
    print(f"wrote {path} ({len(indices)} images x {len(policies)} policies x {args.pairs} pairs)")
    return 0
