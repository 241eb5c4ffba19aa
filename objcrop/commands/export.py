"""``objcrop export``: a checkpoint's backbone as a torchvision state_dict or a Detectron2 .pkl."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a pretrained backbone (torchvision or Detectron2)",
        description=(
            "Writes the backbone of an objcrop checkpoint as a torchvision ResNet state_dict (load with "
            "strict=False: no fc; the architecture goes to <out>.json) or as a Detectron2 .pkl in the layout "
            "of MoCo's converter (not for the small-image stem)."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="ckpt-*.pt written by objcrop pretrain")
    p.add_argument("--to", choices=("torchvision", "detectron2"), default="torchvision")
    p.add_argument("--out", required=True, help="output file (.pth for torchvision, .pkl for Detectron2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.ssl.checkpoint import CheckpointError
    from objcrop.ssl.export import export_detectron2, export_torchvision

    try:
        if args.to == "detectron2":
            path = export_detectron2(args.checkpoint, args.out)
            print(f"wrote Detectron2 backbone weights to {path}")
        else:
            path = export_torchvision(args.checkpoint, args.out)
            print(f"wrote backbone weights (torchvision or timm names) to {path} (architecture in {path}.json)")
    except CheckpointError as err:
        print(f"objcrop export: error: {err}", file=sys.stderr)
        return 2
    return 0
