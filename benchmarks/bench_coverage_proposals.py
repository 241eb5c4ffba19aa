"""Coverage on coco128 by proposal source: our COCO-trained BING and OpenCV's BING, with today's crops.

For each source, ``objcrop propose`` writes a proposal store over coco128 and ``objcrop analyze coverage``
samples view pairs from it exactly as training does (obj-scene and obj-obj-dilate, 50 pairs per image,
seed 0), scoring the share of the two views' intersection that ground-truth boxes cover. Our BING is the
default one of ``benchmarks/bench_proposals.py`` (rgb, trained on the COCO images of ../shared/data that are
not in coco128; cached in ``--work``); OpenCV's is ``cv2.saliency.ObjectnessBING`` with its VOC model. The
result file holds one row per source; each source's own coverage file stays in ``--work``.

    python benchmarks/bench_coverage_proposals.py --work /tmp/coverage-by-proposals \
        --json benchmarks/results/coverage-by-proposals-coco128.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_proposals, next to this script

import bench_proposals  # noqa: E402

from objcrop import cli  # noqa: E402

COCO128 = bench_proposals.DATA / "coco128"
POLICIES = ("obj-scene", "obj-obj-dilate")
DATASET = ["--format", "coco", "--annotations", str(COCO128 / "annotations" / "instances_train2017.json")]
DATASET += ["--images", str(COCO128 / "train2017")]


def our_bing(work: Path, workers: int) -> Path:
    """The model file of our default BING, trained here unless ``work`` holds it already."""
    test = bench_proposals.coco128()
    train = bench_proposals.training_records({os.path.basename(test.key(i)) for i in range(len(test))})
    config = bench_proposals.TrainConfig()
    bench_proposals.trained(work, "bing_rgb", train, ("rgb",), config, workers)
    return work / "bing_rgb.npz"


def coverage_of(work: Path, name: str, backend: str, model: Path, args: argparse.Namespace) -> dict:
    """Proposes with ``backend`` over coco128 (resumable) and returns its coverage result file."""
    store, out = work / f"store-{name}", work / f"coverage-{name}.json"
    propose = ["propose", "--backend", backend, "--model", str(model), *DATASET, "--out", str(store)]
    if cli.main([*propose, "--workers", str(args.workers), "--no-progress"]) != 0:
        raise SystemExit(f"objcrop propose failed for {name}")
    analyze = ["analyze", "coverage", *DATASET, "--proposals", str(store), "--out", str(out)]
    analyze += [arg for p in POLICIES for arg in ("--policy", p)]
    analyze += ["--pairs-per-image", str(args.pairs_per_image), "--seed", str(args.seed)]
    if cli.main(analyze) != 0:
        raise SystemExit(f"objcrop analyze coverage failed for {name}")
    return json.loads(out.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, the stores and their files")
    parser.add_argument("--workers", type=int, default=1, help="processes for training and proposing (default 1)")
    parser.add_argument("--pairs-per-image", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write a result file (benchmarks/results/)")
    args = parser.parse_args(argv)
    if not COCO128.is_dir():
        parser.error(f"coco128 not found: {COCO128}")
    args.work.mkdir(parents=True, exist_ok=True)

    sources = {
        "our BING (COCO-trained, rgb)": ("ours", "bing", our_bing(args.work, args.workers)),
        "OpenCV BING (cv2.saliency, VOC model)": ("opencv", "opencv-bing", bench_proposals.OPENCV_MODEL),
    }
    rows = []
    for label, (name, backend, model) in sources.items():
        result = coverage_of(args.work, name, backend, model, args)
        by_policy = {r["policy"]: r for r in result["results"]}
        rows.append(
            {
                "proposals": label,
                "coverage": {p: [by_policy[p]["mean_gt_fraction"], by_policy[p]["ci95"]] for p in POLICIES},
                "pairs": {p: by_policy[p]["pairs"] for p in POLICIES},
                "fallbacks": {p: by_policy[p]["fallbacks"] for p in POLICIES},
                "settings": result["settings"],
            }
        )
        print(label, {p: round(by_policy[p]["mean_gt_fraction"], 3) for p in POLICIES}, flush=True)
    if args.json:
        from objcrop.commands.analyze_results import write_result

        write_result(args.json, "coverage-by-proposals", {"policies": list(POLICIES), "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
