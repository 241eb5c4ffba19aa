"""``objcrop export``: a checkpoint's backbone as a torchvision state_dict or a Detectron2 .pkl."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a pretrained backbone (torchvision or Detectron2)")
    p.add_argument("--checkpoint", required=True, help="ckpt-*.pt written by objcrop pretrain")
    p.add_argument("--to", choices=("torchvision", "detectron2"), default="torchvision")
    p.add_argument("--out", required=True, help="output file (.pth for torchvision, .pkl for Detectron2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from objcrop.ssl.export import export_detectron2, export_torchvision

    path = (
        export_detectron2(args.checkpoint, args.out)
        if args.to == "detectron2"
        else export_torchvision(args.checkpoint, args.out)
    )
    print(f"wrote {args.to} backbone weights to {path}")
    return 0
