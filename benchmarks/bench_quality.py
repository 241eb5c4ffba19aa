"""The paper's claim at laptop scale: does object-aware cropping give a better representation?

For each dataset, in one process and with equal compute per arm:

* (a) ``synth``: procedural non-iconic scenes (``objcrop synth``);
* (b) ``sprites``: real photos, CIFAR-10 sprites pasted small onto COCO backgrounds from ../shared/data
  (``objcrop synth --sprites --backgrounds``);

it pretrains MoCo (ResNet-18; in-batch negatives by default, see ``--queue-size``) with scene-scene,
obj-scene and obj-obj-dilate crops over several seeds,
plus single rows with separate projection heads, GT-box proposals and OpenCV BING proposals, and a
random-init and a supervised reference. Every backbone is scored by the multi-label linear probe
(test mAP, %) at two fixed read-out resolutions. It prints mean and 95 % CI (Student t over seeds)
and writes ``OUT/quality.json``, ``OUT/quality.md`` and ``OUT/quality.png``.

    # one process per dataset, each on one core (about 1 h 45 min on 2 cores):
    python benchmarks/bench_quality.py --datasets synth --out bench_quality/synth &
    python benchmarks/bench_quality.py --datasets sprites --out bench_quality/sprites
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

from objcrop.analysis.plots import plot_bars
from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.demo import DemoSettings, pretrain_config
from objcrop.evaluate.linear import linear_probe
from objcrop.evaluate.supervised import supervised_baseline
from objcrop.proposals.builder import build_store
from objcrop.ssl.trainer import pretrain

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval (the interval is the mean itself for one value)."""
    m = float(np.mean(values))
    if len(values) < 2:
        return m, m, m
    half = T95.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return m, m - half, m + half


def make_data(name: str, root: Path, settings: DemoSettings, seed: int) -> Path:
    out = root / f"data-{name}"
    if (out / "test.json").exists():
        return out
    kwargs = dict(seed=seed, size=settings.image_size, workers=2, progress=False, **settings.scene_kwargs())
    if name == "synth":
        synthesize(out, settings.images, **kwargs)
    else:
        sprites, backgrounds = SHARED / "cifar10_test_subset" / "test", SHARED / "coco128" / "train2017"
        if not sprites.is_dir() or not backgrounds.is_dir():
            raise SystemExit(f"the sprites dataset needs {sprites} and {backgrounds}")
        synthesize(out, settings.images, sprites=sprites, backgrounds=backgrounds, **kwargs)
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


def run_dataset(name: str, args: argparse.Namespace, settings: DemoSettings) -> dict:
    root = Path(args.out)
    data = make_data(name, root, settings, seed=1000)
    train = load_records("coco", annotations=str(data / "train.json"), images=str(data / "images"))
    test = load_records("coco", annotations=str(data / "test.json"), images=str(data / "images"))
    backends = [args.proposals] + (["opencv-bing"] if args.opencv_bing_row else [])
    stores = proposal_stores(data, train, backends, max(settings.workers, 1))
    main_store = stores[args.proposals]
    sizes = args.readout

    rows: list[tuple[str, str, str, dict]] = [  # label, policy, store, extra overrides
        ("scene-scene", "scene-scene", "gt", {}),
        ("obj-scene", "obj-scene", main_store, {}),
        ("obj-obj-dilate", "obj-obj-dilate", main_store, {}),
    ]
    extra_rows = [
        ("obj-obj-dilate + separate heads", "obj-obj-dilate", main_store, {"method.separate_heads": True}),
        ("obj-obj-dilate, GT boxes", "obj-obj-dilate", "gt", {}),
    ]
    if args.opencv_bing_row:
        extra_rows.append(("obj-obj-dilate, OpenCV BING", "obj-obj-dilate", stores["opencv-bing"], {}))

    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    for label, policy, store, extra in rows + extra_rows:
        seeds = args.seeds if (label, policy, store, extra) in rows else args.extra_seeds
        per_size: dict[int, list[float]] = {s: [] for s in sizes}
        for seed in range(seeds):
            run = root / f"runs-{name}" / f"{label.replace(' ', '_').replace(',', '')}-seed{seed}"
            settings.seed = seed
            settings.extra = {"train.progress": False, **extra}
            config = pretrain_config(settings, data, store, policy, run)
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

    results["random init"] = {
        str(s): [v] for s, v in probe_all("random:resnet18", train, test, sizes, root / f"features-{name}", 0).items()
    }
    sup = supervised_baseline(
        train,
        test,
        root / f"runs-{name}" / "supervised.pth",
        arch="resnet18",
        small_images=False,
        size=args.readout[0],
        epochs=args.supervised_epochs,
        seed=0,
        batch_size=settings.batch_size,
        progress=False,
    )
    results["supervised (same backbone), linear probe"] = {str(args.readout[0]): [sup.linear["value"]]}
    results["supervised (same backbone), own head"] = {str(args.readout[0]): [sup.head_value]}
    chance = linear_probe("random:resnet18", train, test, size=sizes[0], progress=False).chance
    return {"results": results, "chance": chance, "minutes": (time.perf_counter() - t_start) / 60}


def table(name: str, outcome: dict, sizes: list[int]) -> str:
    lines = [
        f"### ({name}) test mAP %, mean [95 % CI] over seeds; chance {outcome['chance']:.1f}",
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
    base = outcome["results"]["scene-scene"]
    ours = outcome["results"]["obj-obj-dilate"]
    for s in sizes:
        gain = float(np.mean(ours[str(s)]) - np.mean(base[str(s)]))
        _, b_lo, b_hi = mean_ci(base[str(s)])
        _, o_lo, o_hi = mean_ci(ours[str(s)])
        overlap = not (o_lo > b_hi or b_lo > o_hi)
        lines.append(
            f"\nobj-obj-dilate - scene-scene @ {s} px: {gain:+.1f} mAP; intervals "
            f"{'overlap' if overlap else 'do not overlap'}"
        )
    return "\n".join(lines)


def main() -> None:
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
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--extra-seeds", type=int, default=1)
    parser.add_argument("--readout", type=int, nargs="+", default=[64, 128], help="the first also trains supervised")
    parser.add_argument("--proposals", default="bing", choices=("bing", "gt"))
    parser.add_argument("--no-opencv-bing-row", dest="opencv_bing_row", action="store_false")
    parser.add_argument("--supervised-epochs", type=int, default=10)
    parser.add_argument(
        "--workers", type=int, default=0, help="loader workers; 0 lets two runs (one per dataset) share 2 cores"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check every step runs")
    args = parser.parse_args()
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
        report.append(table(name, outcomes[name], args.readout))
        print(report[-1], flush=True)
        (out / "quality.json").write_text(json.dumps({"args": vars(args), "outcomes": outcomes}, indent=1))
    (out / "quality.md").write_text("\n\n".join(report) + "\n")
    for name, outcome in outcomes.items():
        size = str(args.readout[0])
        means = {k: float(np.mean(v[size])) for k, v in outcome["results"].items() if v.get(size)}
        cis = {k: mean_ci(v[size])[1:] for k, v in outcome["results"].items() if v.get(size)}
        plot_bars(means, out / f"quality-{name}.png", errors=cis, ylabel="test mAP (%)", reference=outcome["chance"])
    print(f"wrote {out / 'quality.md'}")


if __name__ == "__main__":
    main()
