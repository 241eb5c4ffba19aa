"""``objcrop pretrain``: self-supervised pretraining from a YAML config (single process or torchrun)."""

from __future__ import annotations

import argparse
import json
import math
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a backbone with MoCo-v2, BYOL or DenseCL and any crop policy",
        description=(
            "Pretrains a backbone. Single process: 'objcrop pretrain --config C.yaml'. Several GPUs or nodes: "
            "'torchrun --nproc_per_node 8 -m objcrop pretrain --config C.yaml'. Resumes from the newest "
            "checkpoint in train.out unless --no-resume."
        ),
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=0.06 (repeatable)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start from scratch; existing checkpoints in train.out are moved to checkpoints.replaced-<time>",
    )
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.ssl.config import load_config

    config = load_config(args.config, args.overrides)
    if args.check:
        print(json.dumps(config, indent=2))
        return 0
    from objcrop.analysis.loss_curve import LossPlot
    from objcrop.crops.dataset import NoUsableImageError
    from objcrop.evaluate.monitors import knn_monitor
    from objcrop.ssl.errors import CheckpointError, NonFiniteLossError
    from objcrop.ssl.trainer import pretrain

    monitors = [m for m in (knn_monitor(config), LossPlot()) if m is not None]
    try:
        result = pretrain(config, resume=not args.no_resume, monitors=monitors)
    except NonFiniteLossError as err:
        print(f"objcrop pretrain: {err}", file=sys.stderr)
        return 3
    except CheckpointError as err:
        print(f"objcrop pretrain: error: {err}", file=sys.stderr)
        return 2
    except NoUsableImageError as err:
        # Raised in a loader worker, the message carries the worker's traceback: its last line is the error.
        message = str(err).strip().splitlines()[-1].removeprefix(f"{NoUsableImageError.__module__}.")
        print(f"objcrop pretrain: error: {message.removeprefix(f'{NoUsableImageError.__name__}: ')}", file=sys.stderr)
        return 2
    if not result.is_main:  # under torchrun, rank 0 reports
        return 0
    # A run that was already finished trains no step: numbers it has not measured are null (JSON has no NaN).
    final_loss = result.final_loss if math.isfinite(result.final_loss) else None
    img_per_s = round(result.images_per_second, 2) if math.isfinite(result.images_per_second) else None
    summary = {
        "steps": result.steps,
        "epochs": result.epochs,
        "final_loss": final_loss,
        "img_per_s": img_per_s,
        "checkpoint": result.checkpoint,
        "skipped_images": result.skipped_images,
        "fallbacks": result.fallbacks,
        "resumed_from": result.resumed_from,
    }
    if result.resumed_from and not args.json:
        print(f"resumed from {result.resumed_from}")
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    else:
        loss = "unknown" if final_loss is None else f"{final_loss:.4f}"
        print(
            f"trained {result.steps} steps ({result.epochs} epochs) at {result.images_per_second:.1f} img/s, "
            f"final loss {loss}; checkpoint {result.checkpoint}; "
            f"{result.skipped_images} unreadable images skipped, {result.fallbacks} scene fallbacks"
        )
    return 0
