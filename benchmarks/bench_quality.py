"""The paper's claim at laptop scale: does object-aware cropping give a better representation?

For each dataset, in one process and with equal compute per arm:

* (a) ``synth``: procedural non-iconic scenes (``objcrop synth``);
* (b) ``sprites``: real photos, CIFAR-10 sprites of 25-50 % of the side (``--sprite-scale``) pasted onto
  COCO backgrounds from ../shared/data (``objcrop synth --sprites --backgrounds``);

it pretrains MoCo (ResNet-18; in-batch negatives by default, see ``--queue-size``) with scene-scene,
obj-scene and obj-obj-dilate crops over several seeds, plus rows with separate projection heads,
GT-box proposals, OpenCV BING proposals and a queue with and without the single-process shuffle-BN
(``--arms`` picks them), and a random-init and a supervised reference. Every backbone is scored by the
multi-label linear probe (test mAP, %) at two fixed read-out resolutions.

The references run first. A dataset is *readable* only when the supervised reference's linear probe
reaches chance + 15 mAP (``--readable-margin``): below that, the task is too hard for this budget, no
SSL difference means anything, and the SSL arms are skipped (``--force`` runs them anyway) with a
"not readable" verdict in the report.

Arms with the same seed share initial weights and sampler order, so comparisons are paired: the
per-seed difference (arm minus its baseline), its mean, a paired Student-t 95 % interval and the
two-sided p-value (``scipy.stats``). It writes ``OUT/quality.json`` (every per-seed value),
``OUT/quality.md`` and ``OUT/quality-<dataset>.png``.

    # one process per dataset, each on one core (about 1 h 45 min on 2 cores):
    python benchmarks/bench_quality.py --datasets synth --out bench_quality/synth &
    python benchmarks/bench_quality.py --datasets sprites --out bench_quality/sprites --readout 128
    python benchmarks/bench_quality.py --quick --out /tmp/bq          # every step, tiny, minutes

Why in-batch negatives: with a queue, MoCo-v2 stays on its ``ln(K + 1)`` plateau for the ~20k samples
per arm that fit here, and every arm ends below random init (see ../shared/BENCHMARK-NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from objcrop.analysis.plots import plot_bars
from objcrop.commands.analyze_results import write_result
from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.demo import DemoSettings, pretrain_config
from objcrop.evaluate.linear import linear_probe
from objcrop.evaluate.supervised import supervised_baseline
from objcrop.io import write_json_atomic, write_text_atomic
from objcrop.proposals.builder import build_store
from objcrop.ssl.trainer import pretrain

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# label -> (policy, proposals: "main" (--proposals) / "gt" / "opencv-bing", config overrides, baseline).
# The baseline is the arm the paired difference is taken against (None: no comparison row).
ARMS: dict[str, tuple[str, str, dict, str | None]] = {
    "scene-scene": ("scene-scene", "gt", {}, None),
    "obj-scene": ("obj-scene", "main", {"method.separate_heads": False}, "scene-scene"),
    "obj-obj-dilate": ("obj-obj-dilate", "main", {"method.separate_heads": False}, "scene-scene"),
    "obj-obj-dilate + separate heads": ("obj-obj-dilate", "main", {"method.separate_heads": True}, "obj-obj-dilate"),
    "obj-obj-dilate, GT boxes": ("obj-obj-dilate", "gt", {"method.separate_heads": False}, "obj-obj-dilate"),
    "obj-obj-dilate, OpenCV BING": (
        "obj-obj-dilate",
        "opencv-bing",
        {"method.separate_heads": False},
        "obj-obj-dilate",
    ),
    # MoCo with a queue (K=1024, well below the dataset), with and without the single-process shuffle-BN.
    "obj-obj-dilate, queue": (
        "obj-obj-dilate",
        "main",
        {"method.queue_size": 1024, "method.separate_heads": False},
        None,
    ),
    "obj-obj-dilate, queue, BN leak": (
        "obj-obj-dilate",
        "main",
        {"method.queue_size": 1024, "method.split_bn_groups": 1, "method.separate_heads": False},
        "obj-obj-dilate, queue",
    ),
}
# The arms name their heads explicitly (the demo's configs use separate heads for two-kind policies).
SPRITE_SCALE = (0.25, 0.5)  # CIFAR sprites' side / image side
DEFAULT_ARMS = ["scene-scene", "obj-scene", "obj-obj-dilate", "obj-obj-dilate + separate heads"]


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval (the interval is the mean itself for one value)."""
    m = float(np.mean(values))
    if len(values) < 2:
        return m, m, m
    half = float(stats.t.ppf(0.975, len(values) - 1)) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return m, m - half, m + half


def paired(arm: list[float], base: list[float]) -> dict:
    """Per-seed differences ``arm - base`` (the first ``n`` seeds of both), with their mean, paired
    Student-t 95 % interval and two-sided p-value; ``None`` for interval and p with one pair."""
    n = min(len(arm), len(base))
    diffs = [float(a - b) for a, b in zip(arm[:n], base[:n], strict=True)]
    mean, lo, hi = mean_ci(diffs)
    p = float(stats.ttest_rel(arm[:n], base[:n]).pvalue) if n >= 2 and np.std(diffs) > 0 else None
    return {"pairs": n, "diffs": diffs, "mean": mean, "ci": [lo, hi] if n >= 2 else None, "p": p}


def make_data(
    name: str, root: Path, settings: DemoSettings, seed: int, sprite_scale: tuple[float, float] = SPRITE_SCALE
) -> Path:
    """The ``synth`` or ``sprites`` dataset under ``root`` (made once; ``sprite_scale`` is for sprites only)."""
    out = root / f"data-{name}"
    kwargs = dict(seed=seed, size=settings.image_size, workers=2, progress=False, **settings.scene_kwargs())
    if name == "sprites":
        # CIFAR sprites at the synthetic scenes' 15-40 % were 19-51 px and nothing learned (supervised
        # 29.4 mAP against chance 26.7): real objects need more pixels than procedural shapes.
        kwargs["min_scale"], kwargs["max_scale"] = sprite_scale
    # The scenes are made once per folder: a rerun with other scene settings must not read the old ones.
    made = root / f"data-{name}.json"
    scenes = {"images": settings.images, **{k: v for k, v in kwargs.items() if k not in ("workers", "progress")}}
    if (out / "test.json").exists():
        before = json.loads(made.read_text()) if made.exists() else None
        if before is not None and before != scenes:
            raise SystemExit(f"{out} holds scenes made with {before}, not {scenes}: use another --out")
        return out
    if name == "synth":
        synthesize(out, settings.images, **kwargs)
    else:
        sprites, backgrounds = SHARED / "cifar10_test_subset" / "test", SHARED / "coco128" / "train2017"
        if not sprites.is_dir() or not backgrounds.is_dir():
            raise SystemExit(f"the sprites dataset needs {sprites} and {backgrounds}")
        synthesize(out, settings.images, sprites=sprites, backgrounds=backgrounds, **kwargs)
    write_json_atomic(made, scenes)
    return out


def proposal_stores(data: Path, train, backends: list[str], workers: int) -> dict[str, str]:
    """Proposal store folders of the train split, one per backend (``gt`` needs none)."""
    stores = {"gt": "gt"}
    if "bing" in backends:
        from objcrop.proposals.bing import BingProposer, save_model, train_bing

        model = data / "bing.npz"
        if not model.exists():
            save_model(train_bing(train, workers=workers), model)
        build_store(train, BingProposer(model, topk=1000), data / "store-bing", workers=workers, topk=1000)
        stores["bing"] = str(data / "store-bing")
    if "opencv-bing" in backends:
        from objcrop.proposals.opencv_backends import OpenCVBing

        model_dir = SHARED / "bing_objectness_model" / "ObjectnessTrainedModel"
        build_store(train, OpenCVBing(str(model_dir)), data / "store-opencv-bing", workers=workers, topk=1000)
        stores["opencv-bing"] = str(data / "store-opencv-bing")
    return stores


def probe_all(spec: str, train, test, sizes: list[int], cache: Path, seed: int) -> dict[int, float]:
    return {
        s: linear_probe(spec, train, test, task="multi", size=s, cache_dir=cache, seed=seed, progress=False).value
        for s in sizes
    }


def readable(outcome: dict, margin: float) -> tuple[bool, str]:
    """Whether the supervised reference's linear probe clears chance by ``margin`` mAP, and the verdict line."""
    sup = outcome["results"].get("supervised (same backbone), linear probe")
    if not sup:
        return True, ""
    size, values = next(iter(sup.items()))
    value, floor = values[0], outcome["chance"] + margin
    if value >= floor:
        return True, f"Readable: supervised {value:.1f} mAP at {size} px >= chance + {margin:g} ({floor:.1f})."
    return False, (
        f"**Not readable**: supervised {value:.1f} mAP at {size} px < chance + {margin:g} ({floor:.1f}); "
        "the task is too hard at this budget, so the SSL arms are not read (they run only with --force)."
    )


def references(name: str, train, test, root: Path, args: argparse.Namespace, settings: DemoSettings) -> dict:
    """Random init and the supervised backbone (linear probe and its own head), at the first read-out.

    Kept in ``references-<name>.json`` with the settings they depend on, so that a rerun (or a second
    process running other arms into the same folder) reuses them instead of training the supervised
    backbone again; other settings compute them anew."""
    key = {
        "readout": list(args.readout),
        "supervised_epochs": args.supervised_epochs,
        "supervised_crop_scale": list(args.supervised_crop_scale),
        "batch": settings.batch_size,
    }
    cached = root / f"references-{name}.json"
    if cached.exists():
        stored = json.loads(cached.read_text())
        if stored.get("settings") == key:
            return stored["rows"]
    rows = compute_references(name, train, test, root, args, settings)
    write_json_atomic(cached, {"settings": key, "rows": rows}, indent=1)
    return rows


def compute_references(name: str, train, test, root: Path, args: argparse.Namespace, settings: DemoSettings) -> dict:
    sizes = args.readout
    rows = {
        "random init": {
            str(s): [v]
            for s, v in probe_all("random:resnet18", train, test, sizes, root / f"features-{name}", 0).items()
        }
    }
    sup = supervised_baseline(
        train,
        test,
        root / f"runs-{name}" / "supervised.pth",
        arch="resnet18",
        small_images=False,
        size=sizes[0],
        epochs=args.supervised_epochs,
        crop_scale=tuple(args.supervised_crop_scale),
        seed=0,
        batch_size=settings.batch_size,
        progress=False,
    )
    rows["supervised (same backbone), linear probe"] = {str(sizes[0]): [sup.linear["value"]]}
    rows["supervised (same backbone), own head"] = {str(sizes[0]): [sup.head_value]}
    return rows


def arm_config(settings: DemoSettings, data: Path, stores: dict[str, str], label: str, seed: int, run: Path) -> dict:
    """The pretraining config of one arm and seed. Only ``seed`` sets the initial weights, the sampler order and
    the augmentation draws, so two arms of one seed differ in their crops (and ``ARMS``' extras) alone: paired."""
    policy, store_key, extra, _ = ARMS[label]
    settings.seed = seed
    settings.extra = {"train.progress": False, **extra}
    return pretrain_config(settings, data, stores[store_key], policy, run)


def run_dataset(name: str, args: argparse.Namespace, settings: DemoSettings) -> dict:
    root = Path(args.out)
    data = make_data(name, root, settings, seed=1000, sprite_scale=tuple(args.sprite_scale))
    train = load_records("coco", annotations=str(data / "train.json"), images=str(data / "images"))
    test = load_records("coco", annotations=str(data / "test.json"), images=str(data / "images"))
    sizes = args.readout
    t_start = time.perf_counter()
    refs = references(name, train, test, root, args, settings)
    chance = linear_probe("random:resnet18", train, test, size=sizes[0], progress=False).chance
    ok, verdict = readable({"results": refs, "chance": chance}, args.readable_margin)
    print(f"[{name}] {verdict}", flush=True)
    arms = args.arms if ok or args.force else []

    wanted = {ARMS[a][1] for a in arms}
    backends = [args.proposals] + (["opencv-bing"] if "opencv-bing" in wanted else [])
    stores = proposal_stores(data, train, backends, max(settings.workers, 1)) if arms else {}
    stores["main"] = stores.get(args.proposals)
    seeds_of = dict(item.split("=") for item in args.arm_seeds)

    results: dict[str, dict] = {}
    for label in arms:
        seeds = int(seeds_of.get(label, args.seeds))
        per_size: dict[int, list[float]] = {s: [] for s in sizes}
        for seed in range(seeds):
            run = root / f"runs-{name}" / f"{label.replace(' ', '_').replace(',', '').replace('+', 'plus')}-seed{seed}"
            config = arm_config(settings, data, stores, label, seed, run)
            t0 = time.perf_counter()
            result = pretrain(config)
            scores = probe_all(result.checkpoint, train, test, sizes, root / f"features-{name}", seed)
            for s in sizes:
                per_size[s].append(scores[s])
            print(
                f"[{name}] {label} seed {seed}: loss {result.final_loss:.3f}, {result.images_per_second:.0f} img/s, "
                f"mAP {', '.join(f'{s}px {v:.1f}' for s, v in scores.items())} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        results[label] = {str(s): per_size[s] for s in sizes}
    results.update(refs)
    outcome = {"results": results, "chance": chance, "minutes": (time.perf_counter() - t_start) / 60}
    outcome["paired"] = comparisons(outcome, sizes)
    return outcome


def comparisons(outcome: dict, sizes: list[int]) -> list[dict]:
    """The paired difference of every arm against its baseline and, for object-aware arms, against
    scene-scene (the paper's claim), when those also ran; per read-out size."""
    rows = []
    for label, per_size in outcome["results"].items():
        bases = [ARMS.get(label, (None, None, None, None))[3]]
        if label in ARMS and ARMS[label][0] != "scene-scene" and "scene-scene" not in bases:
            bases.append("scene-scene")
        for base in bases:
            if base is None or base not in outcome["results"]:
                continue
            for s in sizes:
                arm, ref = per_size.get(str(s)), outcome["results"][base].get(str(s))
                if arm and ref:
                    rows.append({"arm": label, "baseline": base, "size": s, **paired(arm, ref)})
    return rows


def report(stored: dict) -> str:
    """The markdown tables of a stored ``quality.json``'s contents (paired rows recomputed from per-seed values)."""
    sizes = list(stored["args"]["readout"])
    margin = stored["args"].get("readable_margin", 15.0)
    parts = []
    for name, outcome in stored["outcomes"].items():
        outcome["paired"] = comparisons(outcome, sizes)
        parts.append(table(name, outcome, sizes, margin))
    return "\n\n".join(parts)


def report_from_json(path: Path) -> str:
    return report(json.loads(Path(path).read_text())) + "\n"


def table(name: str, outcome: dict, sizes: list[int], margin: float = 15.0) -> str:
    lines = [
        f"### ({name}) test mAP %, mean [95 % t-interval] over seeds; chance {outcome['chance']:.1f}",
        "",
        readable(outcome, margin)[1],
        "",
        "| arm | seeds | " + " | ".join(f"mAP @ {s} px" for s in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for label, per_size in outcome["results"].items():
        cells = []
        for s in sizes:
            values = per_size.get(str(s))
            if not values:
                cells.append("-")
                continue
            m, lo, hi = mean_ci(values)
            cells.append(f"{m:.1f}" if len(values) == 1 else f"{m:.1f} [{lo:.1f}, {hi:.1f}]")
        n = max(len(v) for v in per_size.values())
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    if not outcome["paired"]:
        return "\n".join(lines)
    lines += [
        "",
        f"Paired by seed ({name}): difference in test mAP points, mean [paired 95 % t-interval], p (two-sided)",
        "",
        "| comparison | read-out | pairs | difference | interval | p | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in outcome["paired"]:
        ci = "-" if c["ci"] is None else f"[{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]"
        p = "-" if c["p"] is None else f"{c['p']:.3f}"
        seeds = ", ".join(f"{d:+.1f}" for d in c["diffs"])
        name = f"{c['arm']} - {c['baseline']}"
        lines.append(f"| {name} | {c['size']} px | {c['pairs']} | {c['mean']:+.1f} | {ci} | {p} | {seeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark (``argv`` as on the command line); returns what ``OUT/quality.json`` holds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_quality")
    parser.add_argument("--datasets", nargs="+", default=["synth", "sprites"], choices=("synth", "sprites"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--min-scale", type=float, default=0.15, help="smallest object side / image side")
    parser.add_argument("--max-scale", type=float, default=0.4, help="largest object side / image side")
    parser.add_argument("--view-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=0, help="0: in-batch negatives (MoCo v3 style)")
    parser.add_argument("--lr", type=float, default=0.06, help="SGD lr at batch 256 (scaled linearly)")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS), metavar="ARM")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of every arm, unless --arm-seeds says otherwise")
    parser.add_argument("--arm-seeds", nargs="*", default=[], metavar="ARM=N", help='e.g. "obj-obj-dilate, GT boxes=1"')
    parser.add_argument("--readout", type=int, nargs="+", default=[64, 128], help="the first also trains supervised")
    parser.add_argument("--proposals", default="bing", choices=("bing", "gt"))
    parser.add_argument("--supervised-epochs", type=int, default=10)
    parser.add_argument(
        "--supervised-crop-scale",
        type=float,
        nargs=2,
        default=[0.2, 1.0],
        metavar=("MIN", "MAX"),
        help="area share of the supervised reference's RandomResizedCrop",
    )
    parser.add_argument(
        "--sprite-scale",
        type=float,
        nargs=2,
        default=list(SPRITE_SCALE),
        metavar=("MIN", "MAX"),
        help="sprites' side / image side",
    )
    parser.add_argument("--readable-margin", type=float, default=15.0, help="supervised must reach chance + this")
    parser.add_argument("--force", action="store_true", help="run the SSL arms even when the dataset is not readable")
    parser.add_argument(
        "--workers", type=int, default=0, help="loader workers; 0 lets two runs (one per dataset) share 2 cores"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check every step runs")
    parser.add_argument("--json", metavar="FILE", help="also write a result file (benchmarks/results/)")
    parser.add_argument("--report", metavar="QUALITY_JSON", help="print the tables of a stored quality.json and stop")
    args = parser.parse_args(argv)
    if args.report:
        print(report_from_json(Path(args.report)), end="")
        return {}
    torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.image_size, args.view_size, args.steps = 64, 64, 32, 3
        args.batch_size, args.seeds, args.readout, args.supervised_epochs = 8, 2, [64], 1

    settings = DemoSettings(
        images=args.images,
        image_size=args.image_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        view_size=args.view_size,
        lr=args.lr,
        threads=args.threads,
        steps=args.steps,
        batch_size=args.batch_size,
        queue_size=args.queue_size,
        workers=args.workers,
        proposals=args.proposals,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, outcomes = [], {}
    for name in args.datasets:
        outcomes[name] = run_dataset(name, args, settings)
        report.append(table(name, outcomes[name], args.readout, args.readable_margin))
        print(report[-1], flush=True)
        write_json_atomic(out / "quality.json", {"args": vars(args), "outcomes": outcomes}, indent=1)
    write_text_atomic(out / "quality.md", "\n\n".join(report) + "\n")
    for name, outcome in outcomes.items():
        size = str(args.readout[0])
        means = {k: float(np.mean(v[size])) for k, v in outcome["results"].items() if v.get(size)}
        # Rows with one value (one seed, or a reference) get no error bar rather than a zero-width one.
        cis = {k: mean_ci(v[size])[1:] for k, v in outcome["results"].items() if len(v.get(size) or []) > 1}
        plot_bars(means, out / f"quality-{name}.png", errors=cis, ylabel="test mAP (%)", reference=outcome["chance"])
    print(f"wrote {out / 'quality.md'}")
    stored = {"args": vars(args), "outcomes": outcomes}
    if args.json:
        write_result(args.json, "quality", stored)
    return stored


if __name__ == "__main__":
    main()
