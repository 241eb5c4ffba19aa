"""``objcrop propose``: run a proposal backend over a dataset and write a proposal store.

Single machine::

    objcrop propose --backend random --format coco --annotations A.json --images DIR --out store/ --workers 4

Several machines (each writes its chunks into ``store/shards``; gather them in one folder, then merge)::

    objcrop propose ... --out store/ --shard 0/4      # machine 0 of 4, likewise 1/4, 2/4, 3/4
    objcrop propose --merge --format coco --annotations A.json --images DIR --out store/

Without ``--shard`` the shard comes from the launcher when there is one: a SLURM job array
(``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``) or torchrun
(``RANK`` of ``WORLD_SIZE``). A killed run resumes when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml

from objcrop.commands._args import add_dataset_args, records_from_args
from objcrop.proposals.backends import GT, backend_names

_MAX_LISTED_FAILURES = 20

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "propose",
        help="compute object proposals of a dataset into a proposal store",
        description=(
            "Runs a proposal backend over every image and writes a proposal store folder (memory-mapped arrays) "
            "for --proposals. Finished chunks are kept, so a killed run resumes; --shard splits the work over "
            "machines and --merge joins their chunks. 'gt' writes the annotated boxes, largest first (note that "
            "'--proposals gt' works without a store)."
        ),
    )
    parser.add_argument("--backend", choices=backend_names(), help="proposal backend (required unless --merge)")
    parser.add_argument("--model", help="model file of the backend, if it takes one")
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, value parsed as YAML (e.g. --opt n=500 --opt scale=[0.1,1]); repeatable",
    )
    add_dataset_args(parser)
    parser.add_argument("--out", required=True, help="store folder to write")
    parser.add_argument("--topk", type=int, default=1000, help="proposals kept per image (0: all; default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="processes running the backend (default 1)")
    parser.add_argument(
        "--shard",
        help="i/n: this machine does chunks c with c %% n == i (default: from SLURM_ARRAY_TASK_ID/COUNT or "
        "RANK/WORLD_SIZE when set, else 0/1)",
    )
    parser.add_argument("--shard-size", type=int, default=256, help="images per chunk (default 256)")
    parser.add_argument("--decode-max-side", type=int, help="decode images with the longer side reduced to this")
    parser.add_argument("--merge", action="store_true", help="only join the chunks in --out into the store")
    parser.add_argument("--keep-shards", action="store_true", help="keep the chunk files after merging")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different proposal store (or another build's chunks) that objcrop wrote in --out",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--json", action="store_true", help='print one JSON object {"images", "seconds", "img_per_s", "failed"}'
    )
    parser.set_defaults(func=run)


def parse_options(items: list[str]) -> dict:
    """``["n=500", "scale=[0.1, 1]"]`` -> ``{"n": 500, "scale": [0.1, 1]}``."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--opt wants KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def shard_of(args: argparse.Namespace, environ=None) -> tuple[int, int]:
    """``--shard`` when given, else the launcher's (SLURM array, torchrun), else ``(0, 1)``; logs which."""
    from objcrop.proposals.builder import parse_shard, shard_from_env

    if args.shard is not None:
        shard, source = parse_shard(args.shard), "--shard"
    else:
        found = shard_from_env(environ)
        shard, source = found if found is not None else ((0, 1), "default (no --shard, no launcher variables)")
    log.info("shard %d/%d (from %s)", *shard, source)
    return shard


def run(args: argparse.Namespace) -> int:
    from objcrop.proposals import make_proposer
    from objcrop.proposals.builder import build_store, merge_store, write_gt_store

    records = records_from_args(args)
    topk = args.topk if args.topk > 0 else None
    if args.merge:
        store = merge_store(args.out, records, keep_shards=args.keep_shards)
        failed = store.meta.get("failed", [])
        _report_failures(failed)
        print(f"merged {args.out}: {len(store)} images, {len(store.boxes)} boxes, {len(failed)} failed")
        return 0
    if args.backend is None:
        raise ValueError("--backend is required (unless --merge)")

    if args.backend == GT:
        if args.shard is not None or args.model or args.opt:
            raise ValueError("'gt' reads the annotations: it takes no --shard, --model or --opt")
        wrote = write_gt_store(records, args.out, topk, overwrite=args.overwrite)
        summary = {"images": len(records) if wrote else 0, "seconds": 0.0, "img_per_s": 0.0, "failed": 0}
        done = "wrote GT store" if wrote else "GT store already complete:"
        message = f"{done} {args.out}: {len(records)} images"
    else:
        shard = shard_of(args)
        options = parse_options(args.opt)
        if args.model:
            options["model"] = args.model
        proposer = make_proposer(args.backend, **options)
        result = build_store(
            records,
            proposer,
            args.out,
            workers=args.workers,
            topk=topk,
            shard=shard,
            shard_size=args.shard_size,
            decode_max_side=args.decode_max_side,
            meta={"backend": args.backend, "params": options},
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
        _report_failures(result.failed)
        summary = {
            "images": result.images,
            "seconds": round(result.seconds, 3),
            "img_per_s": round(result.img_per_s, 2),
            "failed": len(result.failed),
        }
        done = (
            f"wrote {args.out}"
            if result.merged
            else f"wrote chunks of shard {shard[0]}/{shard[1]} into {args.out}/shards"
        )
        message = (
            f"{done}: {result.images} images in {result.seconds:.1f} s ({result.img_per_s:.1f} img/s), "
            f"{result.skipped} done before, {len(result.failed)} failed"
        )
    print(json.dumps(summary) if args.json else message)
    return 0


def _report_failures(failed) -> None:
    for key, reason in list(failed)[:_MAX_LISTED_FAILURES]:
        print(f"failed: {key}: {reason}", file=sys.stderr)
    if len(failed) > _MAX_LISTED_FAILURES:
        more = len(failed) - _MAX_LISTED_FAILURES
        print(f"... and {more} more (the merged store's meta.json lists all)", file=sys.stderr)
