"""The quality comparison at a scale a CPU cannot reach, in one command of at most 8 minutes on one GPU.

On one H100/H200 with 16 CPU cores:

1. synthesizes ``--images`` (12,000) scenes of 160 px on 16 processes (2-4 objects of 15-40 % of the side,
   the quality benchmark's scene settings);
2. trains our BING on the boxes of 2,000 train scenes and computes proposals for the whole train split;
3. times a short calibration run and the random-init probe, then fixes the steps of every run so that
   the whole command fits ``--time-budget`` (never more than ``--steps``);
4. pretrains MoCo (ResNet-18, 112 px views, in-batch negatives at batch 256, bf16, views made on the
   GPU) with scene-scene and obj-obj-dilate crops, equal steps, 2 seeds; arms with the same seed share
   initial weights and sampler order;
5. scores every backbone with the linear probe on cached features (multi-label test mAP at the
   ``--readout`` sizes);
6. writes ``OUT/gpu_quality.json`` (every value, the plan, the timings, the hardware) and
   ``OUT/gpu_quality.md`` with the paired per-seed difference, its t-interval and p.

The time guard: when a seed's pair of runs would no longer fit the budget (measured on the runs so far),
the remaining seeds are skipped and the summary is written from the complete pairs.

    python benchmarks/gpu_quality.py --out gpu_quality      # one H100/H200, 16 cores: at most ~8 min
    python benchmarks/gpu_quality.py --quick --out /tmp/gq  # every step, tiny, on CPU, under a minute

Sizes come from measured rates (``RATES``): the H200 trains MoCo-v2 ResNet-50 at 224 px at about
2,860 img/s, and a 16-core loader feeds about 1,600 img/s at 224 px. ResNet-18 at 112 px needs about
9x fewer FLOPs per image and the loader decodes 160 px scenes, so the estimate assumes 4,000 img/s,
which the calibration run replaces by the measured rate.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from bench_quality import mean_ci, paired

from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.demo import DemoSettings, pretrain_config
from objcrop.evaluate.linear import linear_probe
from objcrop.io import write_json_atomic, write_text_atomic
from objcrop.proposals.builder import build_store
from objcrop.ssl.trainer import pretrain

ARMS = ("scene-scene", "obj-obj-dilate")
BASELINE, ARM = ARMS

# Assumed rates for the printed estimate (the calibration run measures the training rate).
RATES = {
    "startup_s": 20.0,  # imports, CUDA context
    "synth_img_s_per_worker": 120.0,  # 160 px scenes; about 90 per core on a loaded 2-core CPU at 128 px
    "bing_s": 30.0,  # BING on 2,000 scenes plus proposals for the train split on 16 processes
    "train_img_s": 4000.0,  # MoCo ResNet-18 at 112 px, loader-bound (see the module docstring)
    "run_overhead_s": 12.0,  # loader workers, cuDNN autotuning, checkpoints, per run
    "probe_s": 10.0,  # feature extraction of all scenes on the GPU plus the lr x wd grid on the CPU
}
BING_TRAIN_IMAGES = 2000


def _say(message: str) -> None:
    print(f"[gpu_quality] {message}", flush=True)


def settings_of(args: argparse.Namespace) -> DemoSettings:
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    return DemoSettings(
        images=args.images,
        image_size=args.image_size,
        min_objects=2,
        max_objects=4,
        min_scale=0.15,
        max_scale=0.4,
        view_size=args.view_size,
        steps=args.steps,
        batch_size=args.batch_size,
        queue_size=args.queue_size,
        lr=args.lr,
        workers=args.workers,
        threads=args.threads,
        proposals=args.proposals,
        extra={
            "train.progress": False,
            "train.device": "cuda" if on_gpu else "cpu",
            "train.precision": "bf16" if on_gpu else "fp32",
            "crops.augment_on": args.augment_on,
            "optim.warmup_epochs": args.warmup_epochs,
        },
    )


def estimate(args: argparse.Namespace, steps: int, seeds: int) -> dict[str, float]:
    """Seconds each phase should take at :data:`RATES`."""
    runs = seeds * len(ARMS)
    train = runs * (steps * args.batch_size / RATES["train_img_s"] + RATES["run_overhead_s"])
    parts = {
        "startup": RATES["startup_s"],
        "synth": args.images / (RATES["synth_img_s_per_worker"] * max(args.workers, 1)),
        "proposals": RATES["bing_s"] if args.proposals == "bing" else 0.0,
        "calibration": RATES["run_overhead_s"] + args.calibration_steps * args.batch_size / RATES["train_img_s"],
        "pretraining": train,
        "probes": (runs + 1) * len(args.readout) * RATES["probe_s"],
    }
    parts["total"] = sum(parts.values())
    return {k: round(v, 1) for k, v in parts.items()}


def make_scenes(args: argparse.Namespace, out: Path, settings: DemoSettings) -> Path:
    data = out / "data"
    if not (data / "test.json").exists():
        synthesize(
            data,
            args.images,
            seed=1000,
            size=args.image_size,
            workers=max(args.workers, 1),
            progress=False,
            **settings.scene_kwargs(),
        )
    return data


def proposals(args: argparse.Namespace, data: Path, train) -> str:
    """The proposal store of the obj-obj-dilate arm (``gt``: the boxes themselves)."""
    if args.proposals == "gt":
        return "gt"
    from objcrop.proposals.bing import BingProposer, save_model, train_bing

    model, store = data / "bing.npz", data / "store-bing"
    if not model.exists():
        save_model(
            train_bing(train.subset(range(min(BING_TRAIN_IMAGES, len(train)))), workers=max(args.workers, 1)), model
        )
    if not (store / "meta.json").exists():
        build_store(
            train, BingProposer(model, topk=1000), store, workers=max(args.workers, 1), topk=1000, progress=False
        )
    return str(store)


def steady_rate(log_csv: Path, batch_size: int) -> float | None:
    """Images per second between the first and the last logged step of a run (the trainer logs the
    cumulative rate since the run's first step, so loader start-up drops out of the difference)."""
    with open(log_csv, newline="", encoding="utf-8") as f:
        rows = [(int(r["step"]), float(r["img_per_s"])) for r in csv.DictReader(f) if r.get("img_per_s")]
    if len(rows) < 2:
        return None
    (s0, r0), (s1, r1) = rows[0], rows[-1]
    dt = s1 * batch_size / r1 - s0 * batch_size / r0
    return (s1 - s0) * batch_size / dt if dt > 0 else None


def plan_steps(args, out: Path, settings: DemoSettings, data: Path, store: str, splits, started: float) -> dict:
    """The steps of every run: ``--steps``, or fewer when the calibration says they would not fit.

    The calibration is a short obj-obj-dilate run (its steady rate and its fixed cost per run) and the
    random-init probe, which the summary needs anyway (the time of one probe).
    """
    saved = out / "plan.json"
    if saved.exists():  # a rerun keeps the plan, so finished runs are reused and arms stay equal
        return json.loads(saved.read_text())
    settings.steps, settings.seed = args.calibration_steps, 0
    settings.extra["train.checkpoint_every_steps"] = args.calibration_steps
    config = pretrain_config(settings, data, store, ARM, out / "calibration")
    config["train"]["log_every_steps"] = max(args.calibration_steps // 4, 1)  # a few rows for the steady rate
    t0 = time.perf_counter()
    result = pretrain(config)
    wall = time.perf_counter() - t0
    rate = steady_rate(out / "calibration" / "log.csv", args.batch_size) or result.images_per_second
    overhead = max(wall - args.calibration_steps * args.batch_size / rate, 0.0)
    t0 = time.perf_counter()
    random_init, chance = probe("random:resnet18", *splits, args, out / "features", 0)
    probe_seconds = time.perf_counter() - t0
    runs = args.seeds * len(ARMS)
    left = args.time_budget - (time.perf_counter() - started) - runs * probe_seconds
    fit = int((left / runs - overhead) * rate / args.batch_size) if left > 0 else 0
    steps = max(min(args.steps, fit), 1)
    per_run = overhead + steps * args.batch_size / rate + probe_seconds
    plan = {
        "steps": steps,
        "steps_asked": args.steps,
        "calibration": {
            "steps": args.calibration_steps,
            "seconds": round(wall, 1),
            "img_per_s": round(rate, 1),
            "overhead_s": round(overhead, 1),
            "probe_s": round(probe_seconds, 1),
        },
        "projected_total_s": round(time.perf_counter() - started + runs * per_run, 1),
        "random_init": random_init,
        "chance": chance,
    }
    write_json_atomic(saved, plan, indent=1)
    return plan


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def probe(spec: str, train, test, args: argparse.Namespace, cache: Path, seed: int) -> tuple[dict[str, float], float]:
    values, chance = {}, math.nan
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    for size in args.readout:
        r = linear_probe(
            spec,
            train,
            test,
            task="multi",
            size=size,
            cache_dir=cache,
            seed=seed,
            workers=args.workers,
            device=device,
            feature_batch_size=256,
            progress=False,
        )
        values[str(size)], chance = r.value, r.chance
    return values, chance


def markdown(summary: dict) -> str:
    args, plan = summary["args"], summary["plan"]
    sizes = [str(s) for s in args["readout"]]
    stopped = f" (stopped early: {summary['stopped']})" if summary["stopped"] else ""
    lines = [
        f"### GPU quality run on {summary['hardware']}: test mAP %, mean [95 % t-interval] over seeds; "
        f"chance {summary['chance']:.1f}",
        "",
        f"{summary['train_images']} train / {summary['test_images']} test scenes of {args['image_size']} px; "
        f"MoCo ResNet-18, {plan['steps']} steps of {args['batch_size']} at {args['view_size']} px per run; "
        f"{summary['minutes']:.1f} min in all{stopped}",
        "",
        "| arm | seeds | " + " | ".join(f"mAP @ {s} px" for s in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for label, per_size in summary["results"].items():
        cells = []
        for s in sizes:
            m, lo, hi = mean_ci(per_size[s])
            cells.append(f"{m:.1f}" if len(per_size[s]) == 1 else f"{m:.1f} [{lo:.1f}, {hi:.1f}]")
        lines.append(f"| {label} | {len(per_size[sizes[0]])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| comparison | read-out | pairs | difference | interval | p | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in summary["paired"]:
        ci = "-" if c["ci"] is None else f"[{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]"
        p = "-" if c["p"] is None else f"{c['p']:.3f}"
        seeds = ", ".join(f"{d:+.1f}" for d in c["diffs"])
        lines.append(
            f"| {ARM} - {BASELINE} | {c['size']} px | {c['pairs']} | {c['mean']:+.1f} | {ci} | {p} | {seeds} |"
        )
    return "\n".join(lines)


def hardware() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    return f"{gpu}, {os.cpu_count()} CPU cores"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_quality")
    parser.add_argument("--images", type=int, default=12_000)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--view-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=1200, help="most steps per run (the time budget may cut them)")
    parser.add_argument("--calibration-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--queue-size", type=int, default=0, help="0: in-batch negatives")
    parser.add_argument("--lr", type=float, default=0.06, help="SGD lr at batch 256 (scaled linearly)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--readout", type=int, nargs="+", default=[128])
    parser.add_argument("--proposals", default="bing", choices=("bing", "gt"))
    parser.add_argument("--augment-on", default="auto", choices=("auto", "loader", "device"))
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu"))
    parser.add_argument("--time-budget", type=float, default=450.0, help="seconds for the whole command")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU, to check every step runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.view_size, args.steps, args.calibration_steps = 40, 64, 32, 2, 2
        args.batch_size, args.readout, args.workers, args.threads, args.device = 8, [32], 0, 1, "cpu"
        args.proposals = "gt"
    for name in ("images", "image_size", "view_size", "steps", "calibration_steps", "batch_size", "seeds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "time_budget"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    if not (math.isfinite(args.warmup_epochs) and args.warmup_epochs >= 0):
        parser.error(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    if args.workers < 0 or args.queue_size < 0 or min(args.readout) < 16:
        parser.error("--workers and --queue-size must be >= 0 and every --readout at least 16")
    return args


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    _say(f"{hardware()}; estimated seconds at the assumed rates: {estimate(args, args.steps, args.seeds)}")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data = make_scenes(args, out, settings)
    train = load_records("coco", annotations=str(data / "train.json"), images=str(data / "images"))
    test = load_records("coco", annotations=str(data / "test.json"), images=str(data / "images"))
    timings["synth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = proposals(args, data, train)
    timings["proposals"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_steps(args, out, settings, data, store, (train, test), started)
    timings["calibration and random-init probe"] = time.perf_counter() - t0
    _say(
        f"plan: {plan['steps']} steps per run (asked {args.steps}); calibration {plan['calibration']}; "
        f"projected total {plan['projected_total_s']} s of the {args.time_budget:.0f} s budget"
    )

    settings.steps = plan["steps"]
    results: dict[str, dict[str, list[float]]] = {a: {str(s): [] for s in args.readout} for a in ARMS}
    stopped, pair_seconds = "", []
    for seed in range(args.seeds):
        # Another pair (both arms and their probes) as long as the longest so far must still fit.
        if seed and time.perf_counter() - started + max(pair_seconds) > args.time_budget:
            stopped = f"seed {seed} of {args.seeds} would end past the {args.time_budget:.0f} s budget"
            _say(f"time guard: {stopped}; summarizing {seed} seed(s)")
            break
        t_pair = time.perf_counter()
        for arm in ARMS:
            t0 = time.perf_counter()
            settings.seed = seed
            settings.extra["train.checkpoint_every_steps"] = settings.steps  # one checkpoint, at the end
            config = pretrain_config(
                settings, data, "gt" if arm == BASELINE else store, arm, out / "runs" / run_name(arm, seed)
            )
            result = pretrain(config)
            seconds = time.perf_counter() - t0
            values, _ = probe(result.checkpoint, train, test, args, out / "features", seed)
            for size, value in values.items():
                results[arm][size].append(value)
            timings[run_name(arm, seed)] = seconds
            _say(
                f"{arm} seed {seed}: {result.steps} steps, loss {result.final_loss:.3f}, "
                f"{result.images_per_second:.0f} img/s, {seconds:.0f} s; mAP {values}"
            )
        pair_seconds.append(time.perf_counter() - t_pair)

    results["random init"] = {s: [v] for s, v in plan["random_init"].items()}
    comparisons = [
        {"arm": ARM, "baseline": BASELINE, "size": s, **paired(results[ARM][str(s)], results[BASELINE][str(s)])}
        for s in args.readout
        if results[ARM][str(s)]
    ]
    summary = {
        "args": vars(args),
        "hardware": hardware(),
        "torch": torch.__version__,
        "plan": plan,
        "train_images": len(train),
        "test_images": len(test),
        "results": {k: v for k, v in results.items() if any(v.values())},
        "chance": plan["chance"],
        "paired": comparisons,
        "stopped": stopped,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }
    report = markdown(summary)
    write_json_atomic(out / "gpu_quality.json", summary, indent=1)
    write_text_atomic(out / "gpu_quality.md", report + "\n")
    print(report, flush=True)
    _say(f"done in {summary['minutes']:.1f} min; wrote {out / 'gpu_quality.md'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
