"""``objcrop demo``: synthetic scenes -> BING -> proposals -> three pretraining arms -> linear probe -> report."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on embedded synthetic scenes and write a report (about 7-9 min on 2 cores)",
    )
    p.add_argument("--out", default="demo_report", help="report folder (default demo_report/)")
    p.add_argument("--quick", action="store_true", help="a tiny run of every step (a minute or two)")
    p.add_argument("--proposals", choices=("bing", "gt"), default="bing", help="proposals of the object arms")
    p.add_argument("--workers", type=int, default=1, help="loader / proposal worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="pretraining steps per arm (default: the demo's own, 320)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.proposals = args.proposals
    settings.workers = args.workers
    settings.seed = args.seed
    if args.steps is not None:
        settings.steps = args.steps
    run_demo(args.out, settings)
    return 0
