"""``objcrop detect``: detection transfer (Faster R-CNN + FPN fine-tuning, COCO box AP)."""

from __future__ import annotations

import argparse
import json
import sys

from objcrop.data.readers import ANNOTATION_FILE_FORMATS as _FORMATS  # detect reads --*-annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "detect",
        help="fine-tune Faster R-CNN + FPN on a pretrained backbone and report COCO box AP",
        description=(
            "Builds a torchvision Faster R-CNN with FPN on the backbone of an objcrop checkpoint, an exported "
            "torchvision state_dict, or a random initialisation (the baseline row), fine-tunes it on the training "
            "set and prints AP, AP50, AP75, APs, APm, APl on the test set. Resumes from OUT/detector.pt. The paper's "
            "full protocol runs in Detectron2 on 'objcrop export --to detectron2' weights (see the README)."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="ckpt-*.pt written by objcrop pretrain")
    source.add_argument("--weights", help="torchvision ResNet state_dict (.pth), e.g. from objcrop export")
    source.add_argument("--random", action="store_true", help="random initialisation (baseline)")
    p.add_argument(
        "--arch", help="torchvision ResNet or timm:<cnn> (default: the checkpoint's or the sidecar's, else resnet50)"
    )
    p.add_argument("--format", choices=_FORMATS, default="coco", help="dataset format of both sets (default coco)")
    p.add_argument("--train-annotations", required=True, help="training annotations (COCO instances JSON, ...)")
    p.add_argument("--train-images", required=True, help="folder of the training images")
    p.add_argument("--test-annotations", required=True, help="test annotations")
    p.add_argument("--test-images", required=True, help="folder of the test images")
    p.add_argument("--classes-csv", help="YOLO class names file or OpenImages class descriptions (both sets)")
    p.add_argument("--max-train-images", type=int, default=0, help="use the first N training images (0: all)")
    p.add_argument("--max-test-images", type=int, default=0, help="use the first N test images (0: all)")
    p.add_argument(
        "--ground-truth",
        choices=("json", "records"),
        help="score against the original COCO JSON (official: crowd regions ignored, segment areas; default for "
        "coco) or the boxes as read (default for other formats)",
    )
    p.add_argument("--epochs", type=int, default=12, help="passes over the training set (default 12, like 1x)")
    p.add_argument("--max-iters", type=int, default=0, help="stop after N iterations (0: no limit)")
    p.add_argument("--batch-size", type=int, default=16, help="images per iteration (default 16)")
    p.add_argument("--lr", type=float, help="base learning rate (default 0.02 x batch / 16)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=1000, help="linear warmup iterations (default 1000)")
    p.add_argument(
        "--lr-steps",
        type=float,
        nargs="*",
        default=[2 / 3, 8 / 9],
        metavar="FRACTION",
        help="fractions of the run where the lr drops 10x (default 0.667 0.889, as 60k/80k of 90k)",
    )
    p.add_argument(
        "--min-size",
        type=int,
        nargs="+",
        default=[800],
        help="shorter side(s) in training; the last one in testing (default 800)",
    )
    p.add_argument("--max-size", type=int, default=1333, help="longest side (default 1333)")
    p.add_argument("--proposals-train", type=int, default=2000, help="RPN proposals per image in training")
    p.add_argument("--proposals-test", type=int, default=1000, help="RPN proposals per image in testing")
    p.add_argument(
        "--rois-per-image", type=int, default=512, help="RoIs sampled per image for the box head (default 512)"
    )
    p.add_argument(
        "--trainable-layers",
        type=int,
        default=3,
        choices=range(6),
        help="ResNet stages trained, from layer4 (default 3 like torchvision; 5 = all)",
    )
    p.add_argument(
        "--norm",
        choices=("frozen", "bn"),
        default="frozen",
        help="frozen: FrozenBatchNorm (torchvision); bn: trainable BN in backbone, FPN and a 4conv1fc box "
        "head (the Detectron2 protocol, which uses SyncBN over 8 GPUs)",
    )
    p.add_argument(
        "--box-head",
        default="auto",
        help="auto (4conv1fc with --norm bn, 2fc with frozen), 2fc or 4conv1fc (default auto)",
    )
    p.add_argument(
        "--anchor-sizes",
        type=int,
        nargs=5,
        metavar="PX",
        help="anchor side per level P2-P6 in pixels of the resized image (default 32 64 128 256 512); "
        "smaller ones suit small images",
    )
    p.add_argument(
        "--fpn-channels", type=int, default=256, help="FPN channels (default 256; fewer make CPU runs faster)"
    )
    p.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default 0.5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 on GPU")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes (default 4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N iterations")
    p.add_argument("--out", default="runs/detect", help="folder of detector.pt and metrics.json")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/detector.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def _records(args: argparse.Namespace, annotations: str, images: str, limit: int):
    from objcrop.data.readers import load_records

    records = load_records(args.format, annotations=annotations, images=images, classes_csv=args.classes_csv)
    if limit < 0:
        raise ValueError(f"image limits must be >= 0, got {limit}")
    return records.subset(range(min(limit, len(records)))) if limit else records


def run(args: argparse.Namespace) -> int:
    import torch

    from objcrop.evaluate.detection import DetectionConfig, run_detection
    from objcrop.evaluate.detection_metrics import METRICS
    from objcrop.evaluate.detection_model import check_detector_options
    from objcrop.ssl.errors import NonFiniteLossError

    ground_truth = args.ground_truth or ("json" if args.format == "coco" else "records")
    if ground_truth == "json" and args.format != "coco":
        raise ValueError("--ground-truth json needs --format coco")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DetectionConfig(
        arch=args.arch,
        trainable_layers=args.trainable_layers,
        norm=args.norm,
        min_size=tuple(args.min_size),
        max_size=args.max_size,
        proposals_train=args.proposals_train,
        proposals_test=args.proposals_test,
        rois_per_image=args.rois_per_image,
        box_head=args.box_head,
        anchor_sizes=tuple(args.anchor_sizes) if args.anchor_sizes else None,
        fpn_channels=args.fpn_channels,
        epochs=args.epochs,
        max_iters=args.max_iters,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters,
        lr_steps=tuple(args.lr_steps),
        hflip_prob=args.hflip,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
    )
    # The model options are checked before any image is read (building the model is the first step that would).
    check_detector_options(config.box_head, config.anchor_sizes, config.fpn_channels)
    train = _records(args, args.train_annotations, args.train_images, args.max_train_images)
    test = _records(args, args.test_annotations, args.test_images, args.max_test_images)
    try:
        result = run_detection(
            train,
            test,
            config,
            args.out,
            weights=args.checkpoint or args.weights,
            test_annotations_json=args.test_annotations if ground_truth == "json" else None,
            resume=not args.no_resume,
            progress=not args.no_progress,
        )
    except NonFiniteLossError as err:
        print(f"objcrop detect: {err}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    shown = [f"{name} {100 * v:.1f}" if (v := result.metrics[name]) >= 0 else f"{name} -" for name in METRICS]
    print("  ".join(shown) + "  (box AP x 100; '-': no test object of that size)")
    print(
        f"fine-tuned {result.train.iterations} iterations at {result.train.images_per_second:.2f} img/s, "
        f"evaluated {result.test_images} images at {result.eval_images_per_second:.2f} img/s "
        f"({result.train.skipped_images + result.test_skipped} unreadable images skipped); "
        f"checkpoint {result.checkpoint}"
    )
    return 0
