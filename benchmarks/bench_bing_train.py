"""BING training cost: the old stage-I solver (dual LinearSVC, every sample) against the new default (primal
LinearSVC, capped seeded samples), trained in the same process on the same data, with the recall of each.

COCO: trained on the COCO images of ../shared/data that are not in coco128 (as in bench_proposals.py), tested on
coco128. Synthetic: ``objcrop synth`` scenes (128 px, seed 0) split 80/20, trained on the ``--synthetic``
training scenes and tested on the held-out ones. Recall: R@k at IoU 0.5 from each image's first 1000
proposals.

Times are seconds of :func:`train_bing` (one process, one thread), wall-clock and CPU (``time.process_time``:
less disturbed by other processes on shared cores), and CPU seconds of the stage-I SVM fits alone; a warm-up
training comes first so that numba's cache and the file cache are loaded for both. "ratio" is old / new.
The old solver on 1,600 synthetic scenes needs minutes, so it runs only with ``--synthetic-old``.

Rows: "old" (dual solver, no caps: training before this change), "new" (the defaults; no cap binds on
these small sets) and "new, small caps" (caps well below the data, as the defaults are on COCO train2017).

    OMP_NUM_THREADS=1 python benchmarks/bench_bing_train.py --synthetic 1600 --synthetic-old
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_proposals import coco128, recall, training_records

from objcrop.data.readers import load_records
from objcrop.data.records import Records
from objcrop.data.synth import synthesize
from objcrop.proposals.bing import BingProposer, TrainConfig, train_bing
from objcrop.proposals.bing import train as bing_train
from objcrop.proposals.bing.train import load_rgb

NEW = TrainConfig()
# What training did before: dual coordinate descent on every sample.
OLD = dataclasses.replace(NEW, svm_solver="dual", max_positives=None, max_negatives=None, max_calibration_windows=None)
# Caps far below the data, as on COCO train2017 or OpenImages with the defaults: does subsampling keep recall?
SMALL = dataclasses.replace(NEW, max_positives=2_000, max_negatives=5_000, max_calibration_windows=2_000)
KS = (10, 100, 1000)


class FitTimer:
    """Adds up the CPU seconds spent in the stage-I SVM fits (wraps ``train._fit_filter``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0
        self._fit = bing_train._fit_filter

    def __enter__(self) -> FitTimer:
        def timed(pos, neg, *args):
            start = time.process_time()
            try:
                return self._fit(pos, neg, *args)
            finally:
                self.seconds += time.process_time() - start
                self.samples += 2 * len(pos) + len(neg)

        bing_train._fit_filter = timed
        return self

    def __exit__(self, *exc) -> None:
        bing_train._fit_filter = self._fit


def train_timed(records: Records, config: TrainConfig):
    with FitTimer() as fit:
        start, cpu = time.perf_counter(), time.process_time()
        model = train_bing(records, ("rgb",), config, progress=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return model, wall, cpu, fit


def compare(name: str, train: Records, test: Records, configs: dict[str, TrainConfig]) -> list[str]:
    images = [load_rgb(test.path(i)) for i in range(len(test))]
    rows, totals = [], {}
    for label, config in configs.items():
        model, wall, cpu, fit = train_timed(train, config)
        totals[label] = (wall, cpu, fit.seconds)
        r = recall(BingProposer(model, max(KS)), images, test)
        # bench_proposals.recall reports its own KS (1, 10, 100, 1000)
        rec = dict(zip((1, 10, 100, 1000), r.tolist(), strict=True))
        s2 = model.info["stage2_windows"]
        rows.append(
            f"| {name} | {label} | {len(train)} | {fit.samples} | {s2} | {wall:.1f} | {cpu:.1f} | {fit.seconds:.2f} | "
            + " | ".join(f"{rec[k]:.3f}" for k in KS)
            + " |"
        )
        print(rows[-1], flush=True)
    if "old" in totals and "new" in totals:
        old, new = totals["old"], totals["new"]
        ratios = " | ".join(f"{o / max(n, 1e-9):.1f}x" for o, n in zip(old, new, strict=True))
        rows.append(f"| {name} | ratio old/new | | | | {ratios} | | | |")
        print(rows[-1], flush=True)
    return rows


def synthetic_sets(folder: Path, n_train: int) -> tuple[Records, Records]:
    total = int(round(n_train / 0.8))
    synthesize(folder, total, seed=0, test_fraction=0.2, progress=False)
    load = lambda part: load_records("coco", annotations=folder / f"{part}.json", images=folder / "images")  # noqa: E731
    return load("train"), load("test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=1600, help="synthetic training scenes (0: none)")
    parser.add_argument("--synthetic-old", action="store_true", help="also train the old solver on them (minutes)")
    parser.add_argument("--skip-coco", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = [
        "| data | solver | train images | stage-I samples | stage-II windows | train s | train CPU s | SVM CPU s | "
        + " | ".join(f"R@{k}" for k in KS)
        + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(KS),
    ]
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_bing_train_") as tmp:
        synth = None
        if args.synthetic:
            synth = synthetic_sets(Path(tmp) / "synth", args.synthetic)
        warm = synth[0] if args.skip_coco else coco128()
        train_bing(warm.subset(np.arange(16)), ("rgb",), NEW, progress=False)  # numba cache, file cache
        if not args.skip_coco:
            test = coco128()
            train = training_records({os.path.basename(test.key(i)) for i in range(len(test))})
            rows += compare("COCO", train, test, {"old": OLD, "new": NEW, "new, small caps": SMALL})
        if synth is not None:
            configs = {"old": OLD} if args.synthetic_old else {}
            configs |= {"new": NEW, "new, small caps": SMALL}
            rows += compare(f"synth {args.synthetic}", synth[0], synth[1], configs)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
