"""``objcrop bing``: train a BING objectness model, or convert OpenCV's trained BING model.

    objcrop bing train --format coco --annotations A.json --images DIR --out bing.npz --colour-spaces rgb,hsv
    objcrop bing import-opencv --opencv-dir ObjectnessTrainedModel --out bing_voc.npz

Use the model with ``objcrop propose --backend bing --model bing.npz ...``.
"""

from __future__ import annotations

import argparse
import json
import time

from objcrop.commands._args import add_dataset_args, records_from_args


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cap(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _spaces(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bing",
        help="train a BING objectness model (or import OpenCV's)",
        description="BING objectness (Cheng et al., CVPR 2014): train on a box-annotated dataset, or convert "
        "OpenCV's ObjNessB2W8*.yml.gz model files into objcrop's model format.",
    )
    sub = parser.add_subparsers(dest="bing_command", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train both BING stages on the GT boxes of a dataset")
    add_dataset_args(train)
    train.add_argument("--out", required=True, help="model file to write (.npz): new, or a BING model objcrop wrote")
    train.add_argument(
        "--colour-spaces", type=_spaces, default=("rgb",), help="comma-separated, of rgb, hsv, gray (default rgb)"
    )
    train.add_argument(
        "--sides",
        type=_ints,
        default=(16, 32, 64, 128, 256, 512),
        help="window side lengths in pixels (default 16,32,64,128,256,512)",
    )
    train.add_argument("--min-boxes", type=int, default=5, help="keep window sizes covering >= this many GT boxes")
    train.add_argument("--negatives", type=int, default=100, help="random negative windows per image (default 100)")
    train.add_argument("--svm-c", type=float, default=1.0, help="stage I LinearSVC C (default 1)")
    train.add_argument(
        "--svm-solver",
        choices=("primal", "dual"),
        default="primal",
        help="stage I SVM solver: primal (default, linear in the samples) or dual (the old one, much slower)",
    )
    train.add_argument(
        "--max-positives", type=_cap, default=100_000, help="cap on stage I positives, or none (default 100000)"
    )
    train.add_argument(
        "--max-negatives", type=_cap, default=200_000, help="cap on stage I negatives, or none (default 200000)"
    )
    train.add_argument(
        "--max-calibration-windows",
        type=_cap,
        default=50_000,
        help="cap on stage II windows per window size, or none (default 50000)",
    )
    train.add_argument("--bases", type=int, default=2, help="binary basis vectors of the filter, Nw (default 2)")
    train.add_argument("--bits", type=int, default=4, help="gradient bit planes, Ng (default 4)")
    train.add_argument("--nss", type=int, default=2, help="non-maximum suppression radius in map cells (default 2)")
    train.add_argument(
        "--rescore",
        action="store_true",
        help="also learn a rescorer of the best windows (better ranking, slower detection)",
    )
    train.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=run_train)

    imp = sub.add_parser("import-opencv", help="convert OpenCV's BING model files")
    imp.add_argument("--opencv-dir", required=True, help="folder with ObjNessB2W8{MAXBGR,HSV,I}.*.yml.gz")
    imp.add_argument("--out", required=True, help="model file to write (.npz): new, or a BING model objcrop wrote")
    imp.add_argument(
        "--colour-spaces", type=_spaces, default=("rgb", "hsv", "gray"), help="which of rgb,hsv,gray (default all)"
    )
    imp.set_defaults(func=run_import)


def run_train(args: argparse.Namespace) -> int:
    from objcrop.proposals.bing import TrainConfig, check_model_path, save_model, train_bing

    check_model_path(args.out)  # before the training, not after it
    records = records_from_args(args)
    config = TrainConfig(
        side_lengths=args.sides,
        min_boxes_per_size=args.min_boxes,
        negatives_per_image=args.negatives,
        svm_c=args.svm_c,
        svm_solver=args.svm_solver,
        max_positives=args.max_positives,
        max_negatives=args.max_negatives,
        max_calibration_windows=args.max_calibration_windows,
        num_bases=args.bases,
        num_bits=args.bits,
        nss=args.nss,
        rescore=args.rescore,
        seed=args.seed,
    )
    start = time.perf_counter()
    model = train_bing(records, args.colour_spaces, config, workers=args.workers, progress=not args.no_progress)
    path = save_model(model, args.out)
    sizes = len(model.sizes)
    print(
        f"wrote {path}: colour spaces {','.join(model.colour_spaces)}, {sizes} window sizes, "
        f"trained on {len(records)} images in {time.perf_counter() - start:.1f} s"
    )
    print(json.dumps(model.info["trained_on"]))
    info = model.info
    print(
        f"stage I: {info['stage1_positives']} positives (+ mirrored), {info['stage1_negatives']} negatives; "
        f"stage II: {info['stage2_windows']} windows"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    from objcrop.proposals.bing import load_opencv_model, save_model

    model = load_opencv_model(args.opencv_dir, colour_spaces=args.colour_spaces)
    path = save_model(model, args.out)
    print(f"wrote {path}: OpenCV BING model, colour spaces {','.join(model.colour_spaces)}")
    return 0
