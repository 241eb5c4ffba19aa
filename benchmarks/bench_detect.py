r"""Detection transfer at laptop scale: Faster R-CNN fine-tuned from three starts on easy synthetic scenes.

Three starts with the same detector, schedule and data:

* random init (BatchNorm trained: a random backbone under frozen BatchNorm diverges);
* a scene-scene MoCo checkpoint and an obj-obj-dilate one, pretrained here with the quality benchmark's
  settings (``benchmarks/bench_quality.py``: its synth scenes, BING proposals, 320 steps of 64 at 32 px),
  or taken from ``--checkpoints`` (e.g. that benchmark's ``runs-synth/<arm>-seed0/checkpoints/*.pt``).

The detection scenes are new ones with large objects (1-3 per image, 25-50 % of the 128 px side), so
that a few hundred CPU iterations learn to detect them. The detector is sized for small images on a CPU:
ResNet-18 + FPN with 128 channels (256 cost twice the time per iteration), no upscaling (min_size =
max_size = 128), torchvision's 2fc box head (Detectron2's 4conv1fc head costs about 3x the rest at these
sizes), 32 RoIs per image, BatchNorm trained everywhere (``norm="bn"``). The anchors stay torchvision's
(32-512 px): their 32 and 64 px anchors on the stride-4 and stride-8 maps fit these objects. Smaller
anchors push them to coarser maps (see ``objcrop.evaluate.detection_model``).
Scores are pycocotools' box AP and AP50 (x 100) on the test split. One seed per start: the table shows
whether the pipeline learns and the order of the starts in this run, not an interval.

    python benchmarks/bench_detect.py --out bench_detect        # about 30 min on 2 idle cores
    python benchmarks/bench_detect.py --out bench_detect --json benchmarks/results/detect-synth.json
    python benchmarks/bench_detect.py --out bench_detect \
        --checkpoints scene-scene=Q/runs-synth/scene-scene-seed0/checkpoints/ckpt-00000320.pt \
                      obj-obj-dilate=Q/runs-synth/obj-obj-dilate-seed0/checkpoints/ckpt-00000320.pt
    python benchmarks/bench_detect.py --quick --out /tmp/bd     # every step, tiny, under a minute

Outputs ``OUT/detect.json`` (every metric and setting) and ``OUT/detect.md``. Rerunning with the same
``--out`` resumes: finished pretraining and fine-tuning runs are not repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from bench_quality import make_data, proposal_stores

from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.demo import DemoSettings, pretrain_config
from objcrop.evaluate.detection import DetectionConfig, run_detection
from objcrop.io import write_json_atomic, write_text_atomic
from objcrop.ssl.trainer import pretrain

STARTS = ("random init", "scene-scene", "obj-obj-dilate")
SHOWN = ("AP", "AP50", "AP75")


def _say(message: str) -> None:
    print(f"[bench_detect] {message}", flush=True)


def quality_settings(args: argparse.Namespace) -> DemoSettings:
    """The quality benchmark's pretraining settings (its command-line defaults), one seed."""
    return DemoSettings(
        images=args.pretrain_images,
        image_size=128 if not args.quick else 64,
        min_objects=2,
        max_objects=4,
        min_scale=0.15,
        max_scale=0.4,
        view_size=32,
        lr=0.06,
        steps=args.pretrain_steps,
        batch_size=64 if not args.quick else 8,
        queue_size=0,
        workers=0,
        threads=args.threads,
        proposals=args.proposals,
        seed=0,
        extra={"train.progress": False},
    )


def pretrained_checkpoints(args: argparse.Namespace, out: Path, wanted: list[str]) -> dict[str, str]:
    """A checkpoint per SSL start: from ``--checkpoints`` or pretrained now (resumed if present)."""
    given = dict(args.checkpoints)
    missing = [arm for arm in wanted if arm != STARTS[0] and arm not in given]
    if not missing:
        return given
    settings = quality_settings(args)
    data = make_data("synth", out, settings, seed=1000)  # the quality benchmark's synth scenes
    train = load_records("coco", annotations=str(data / "train.json"), images=str(data / "images"))
    stores = proposal_stores(data, train, [args.proposals], max(args.workers, 1))
    for arm in missing:
        t0 = time.perf_counter()
        store = "gt" if arm == "scene-scene" else stores[args.proposals]
        config = pretrain_config(settings, data, store, arm, out / "pretrain" / f"{arm}-seed0")
        result = pretrain(config)
        _say(f"pretrained {arm}: {result.steps} steps, loss {result.final_loss:.3f} ({time.perf_counter() - t0:.0f} s)")
        given[arm] = result.checkpoint
    return given


def detection_config(args: argparse.Namespace) -> DetectionConfig:
    """The fine-tuning settings every start shares (see the module docstring)."""
    size = args.scene_size
    return DetectionConfig(
        arch="resnet18",
        trainable_layers=5,
        norm="bn",
        box_head="2fc",
        fpn_channels=args.fpn_channels,
        anchor_sizes=tuple(args.anchor_sizes) if args.anchor_sizes else None,
        min_size=(size,),
        max_size=size,
        proposals_train=256,
        proposals_test=100,
        rois_per_image=32,
        epochs=10_000,
        max_iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_iters=max(args.iters // 10, 1),
        lr_steps=(0.75,),
        hflip_prob=0.5,
        seed=0,
        device="cpu",
        workers=0,
        eval_batch_size=16,
    )


def detection_scenes(args: argparse.Namespace, out: Path):
    """Train and test records of the detection scenes (written once)."""
    data = out / "data-detect"
    if not (data / "test.json").exists():
        synthesize(
            data,
            args.images,
            seed=2000,
            size=args.scene_size,
            min_objects=1,
            max_objects=3,
            min_scale=0.25,
            max_scale=0.5,
            workers=max(args.workers, 1),
            progress=False,
        )
    return tuple(
        load_records("coco", annotations=str(data / f"{split}.json"), images=str(data / "images"))
        for split in ("train", "test")
    )


def table(rows: dict[str, dict], config: DetectionConfig, train_images: int, test_images: int) -> str:
    lines = [
        f"Detection transfer: Faster R-CNN (ResNet-18 + FPN) fine-tuned {config.max_iters} iterations of "
        f"{config.batch_size} on {train_images} synthetic scenes of {config.max_size} px, box AP x 100 on "
        f"{test_images} test scenes (pycocotools), one seed per start",
        "",
        "| start | " + " | ".join(SHOWN) + " | final loss | fine-tune img/s |",
        "|---|" + "---|" * (len(SHOWN) + 2),
    ]
    for name, r in rows.items():
        cells = " | ".join(f"{100 * r[k]:.1f}" for k in SHOWN)
        lines.append(f"| {name} | {cells} | {r['final_loss']:.3f} | {r['train_img_per_s']:.1f} |")
    order = sorted(rows, key=lambda n: rows[n]["AP50"], reverse=True)
    lines += ["", "Measured order by AP50: " + " > ".join(order)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_detect")
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS, metavar="START")
    parser.add_argument("--checkpoints", nargs="*", default=[], metavar="START=PATH", help="skip pretraining START")
    parser.add_argument("--images", type=int, default=2000, help="detection scenes (80 %% train, 20 %% test)")
    parser.add_argument("--scene-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=400, help="fine-tuning iterations of every start")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--fpn-channels", type=int, default=128)
    parser.add_argument("--anchor-sizes", type=int, nargs=5, metavar="PX", help="P2-P6 (default torchvision's)")
    parser.add_argument("--pretrain-images", type=int, default=2000, help="the quality benchmark's synth scenes")
    parser.add_argument("--pretrain-steps", type=int, default=320)
    parser.add_argument("--proposals", default="bing", choices=("bing", "gt"), help="of the obj-obj-dilate start")
    parser.add_argument("--workers", type=int, default=2, help="processes for scenes and proposals")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check every step runs")
    parser.add_argument("--json", metavar="FILE", help="also write a result file (benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.scene_size, args.iters, args.batch_size = 24, 64, 3, 4
        args.pretrain_images, args.pretrain_steps, args.proposals, args.workers = 32, 2, "gt", 1
    for name in ("images", "scene_size", "iters", "batch_size", "fpn_channels", "pretrain_images", "pretrain_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.anchor_sizes and min(args.anchor_sizes) < 1:
        parser.error(f"--anchor-sizes must be positive, got {args.anchor_sizes}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.scene_size < 32:
        parser.error(f"--scene-size must be at least 32, got {args.scene_size}")
    pairs = []
    for item in args.checkpoints:  # checked before any work starts
        start, sep, path = item.partition("=")
        if not sep or not path:
            parser.error(f"--checkpoints wants START=PATH, got {item!r}")
        if start not in STARTS[1:]:
            parser.error(f"--checkpoints: unknown start {start!r}; choose from {', '.join(STARTS[1:])}")
        if not Path(path).is_file():
            parser.error(f"--checkpoints: the {start} checkpoint is not a file: {path}")
        pairs.append((start, path))
    args.checkpoints = pairs
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, test = detection_scenes(args, out)
    checkpoints = pretrained_checkpoints(args, out, args.starts)
    minutes_pretrain = (time.perf_counter() - started) / 60
    config = detection_config(args)
    rows: dict[str, dict] = {}
    for start in args.starts:
        t0 = time.perf_counter()
        weights = None if start == STARTS[0] else checkpoints[start]
        _say(f"fine-tuning from {start} ({config.max_iters} iterations of {config.batch_size})")
        run = out / "detect" / start.replace(" ", "-")
        result = run_detection(train, test, config, run, weights=weights, progress=False)
        rows[start] = {**result.to_dict(), "weights": weights, "seconds": round(time.perf_counter() - t0, 1)}
        _say(f"{start}: " + ", ".join(f"{k} {100 * result.metrics[k]:.1f}" for k in SHOWN))
    report = table(rows, config, len(train), len(test))
    summary = {
        "args": vars(args),
        "config": dataclasses.asdict(config),
        "results": rows,
        "minutes_data_and_pretraining": round(minutes_pretrain, 2),
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }
    write_json_atomic(out / "detect.json", summary, indent=1)
    if args.json:
        from objcrop.commands.analyze_results import write_result

        settings = {k: v for k, v in vars(args).items() if k not in ("out", "json", "checkpoints")}
        settings |= {"train_images": len(train), "test_images": len(test), "checkpoints": dict(args.checkpoints)}
        keep = (*SHOWN, "final_loss", "train_iters", "seconds")
        results = {start: {k: row.get(k) for k in keep} for start, row in rows.items()}
        write_result(args.json, "detect", {"settings": settings, "results": results, "minutes": summary["minutes"]})
    write_text_atomic(out / "detect.md", report + "\n")
    print(report, flush=True)
    _say(f"done in {summary['minutes']:.1f} min; wrote {out / 'detect.md'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
