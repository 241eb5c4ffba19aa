"""CPU training throughput: the Trainer's MoCo-v2 step against a plain fp32 reference step, and the loader.

In this one process, with the same backbone (ResNet-18, normal stem), view size (96 px), batch and
real two-view batches, it times

- ours: :meth:`objcrop.ssl.trainer.Trainer.train_step`, the trainer's default path
  (``train.precision=auto``: bf16 autocast where the CPU has native bf16, else fp32; channels_last);
- reference: :func:`objcrop.ssl.reference.reference_moco_v2_step`, written from the MoCo-v2
  pseudocode (fp32, contiguous, a Python loop for the momentum update) on copies of the same nets;
- the loader: the trainer's DataLoader (object-aware crops, ``--workers`` processes) producing
  view pairs, timed alone from the creation of the iterator to the last batch.

Before timing it checks that both steps compute the same loss on the same inputs in fp32 (with the
single-process shuffle-BN emulation off, which the pseudocode lacks; the timed step keeps it, as training does). Repeats
are interleaved (ours, reference, loader in a shuffled order each round); the table shows medians
and the median of the per-round ratio. On a machine shared with other jobs the numbers are noisy:
compare the ratio rather than the absolute rates.

    python benchmarks/bench_train.py --threads 2 --batch 64 --size 96 --repeats 5
    python benchmarks/bench_train.py --precision auto bf16   # also time forced bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from objcrop.ssl.config import load_config
from objcrop.ssl.reference import reference_moco_v2_step
from objcrop.ssl.trainer import Trainer

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"


class _Encoder(nn.Module):
    """A view encoder as a plain ``images -> embeddings`` module, for the reference step."""

    def __init__(self, encoder: nn.Module, kinds: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.kinds = kinds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder([x], self.kinds[: x.shape[0]])[0]


def data_settings(tmp: Path, synth_images: int) -> tuple[dict, str]:
    """coco128 when present (real 640 px JPEGs), else synthetic scenes written to ``tmp``."""
    if (COCO128 / "annotations" / "instances_train2017.json").is_file():
        return {
            "data.annotations": str(COCO128 / "annotations" / "instances_train2017.json"),
            "data.images": str(COCO128 / "train2017"),
        }, "coco128 (640 px JPEG)"
    from objcrop.data.synth import synthesize

    synthesize(tmp / "scenes", num_images=synth_images, seed=0, size=160, progress=False)
    return {
        "data.annotations": str(tmp / "scenes" / "train.json"),
        "data.images": str(tmp / "scenes" / "images"),
    }, f"synthetic scenes ({synth_images} x 160 px)"


def make_trainer(args: argparse.Namespace, data: dict, out: Path, precision: str) -> Trainer:
    settings = {
        **data,
        "crops.size": args.size,
        "crops.policy": "obj-obj-dilate",
        "method.backbone": "resnet18",
        "method.queue_size": args.queue,
        "optim.batch_size": args.batch,
        "optim.epochs": 1000,
        "train.out": str(out),
        "train.device": "cpu",
        "train.precision": precision,
        "train.channels_last": True,
        "train.workers": args.workers,
        "train.threads": args.threads,
        "train.tensorboard": False,
        "train.progress": False,
    }
    return Trainer(load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))


def reference_setup(trainer: Trainer, kinds: torch.Tensor):
    """fp32, contiguous copies of the trainer's encoders, queue and optimizer settings."""
    method = trainer.method
    f_q = _Encoder(copy.deepcopy(method.query_encoder).to(memory_format=torch.contiguous_format), kinds)
    f_k = _Encoder(copy.deepcopy(method.key_encoder).to(memory_format=torch.contiguous_format), kinds)
    group = trainer.optimizer.param_groups[0]
    optimizer = torch.optim.SGD(
        f_q.parameters(), lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"]
    )
    queue = method.queue.keys.clone()
    return f_q, f_k, queue, optimizer


def check_same_loss(trainer: Trainer, batch: dict) -> float:
    """|our fp32 loss - reference loss| on the same weights, queue and inputs."""
    model = copy.deepcopy(trainer.method).to(memory_format=torch.contiguous_format).train()
    model.split_bn_groups = 1  # the pseudocode has no single-process shuffle-BN emulation: compare without it
    views, kinds = batch["views"], batch["kinds"]
    ours = model({"views": views, "kinds": kinds})["loss"].item()
    f_q, f_k, queue, optimizer = reference_setup(trainer, kinds[:, :1])
    ref, _ = reference_moco_v2_step(f_q, f_k, queue, views[0], views[1], optimizer, model.momentum, model.temperature)
    return abs(ours - ref.item())


def time_ours(trainer: Trainer, batches: list[dict]) -> float:
    start = time.perf_counter()
    for batch in batches:
        trainer.train_step(batch)
    return len(batches) * trainer.batch_per_rank / (time.perf_counter() - start)


def time_reference(setup, batches: list[dict], momentum: float, temperature: float) -> float:
    f_q, f_k, queue, optimizer = setup
    start = time.perf_counter()
    for batch in batches:
        _, queue = reference_moco_v2_step(
            f_q, f_k, queue, batch["views"][0], batch["views"][1], optimizer, momentum, temperature
        )
    setup[2] = queue
    return len(batches) * batch["views"][0].shape[0] / (time.perf_counter() - start)


def time_loader(trainer: Trainer, batches: int) -> float:
    """Images/s of the trainer's DataLoader, worker start-up included."""
    trainer.sampler.set_epoch(0)
    start = time.perf_counter()
    images = 0
    for i, batch in enumerate(trainer._loader()):
        images += batch["views"][0].shape[0]
        if i + 1 == batches:
            break
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path and round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader-batches", type=int, default=4)
    parser.add_argument("--synth-images", type=int, default=512)
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"])
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write a result file (benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, data_name = data_settings(tmp, args.synth_images)
        trainers = {p: make_trainer(args, data, tmp / f"run-{p}", p) for p in args.precision}
        first = next(iter(trainers.values()))
        loader = first._loader()
        batches = [b for b, _ in zip(loader, range(args.steps), strict=False)]
        del loader
        diff = check_same_loss(first, batches[0])
        print(
            f"data: {data_name}; ResNet-18 at {args.size} px, batch {args.batch}, queue {args.queue}, "
            f"{args.threads} threads, {args.workers} loader workers"
        )
        print(f"fp32 loss, ours vs reference on the same inputs: |difference| = {diff:.2e}")
        resolved = {p: "fp32" if t.dtype is None else str(t.dtype).replace("torch.", "") for p, t in trainers.items()}
        for p, t in trainers.items():
            print(f"ours[{p}] runs in {resolved[p]}, channels_last={t.channels_last}")

        setup = list(reference_setup(first, batches[0]["kinds"][:, :1]))
        momentum, temperature = first.method.momentum, first.method.temperature
        for t in trainers.values():  # warm-up: oneDNN primitive creation, allocator
            time_ours(t, batches[:1])
        time_reference(setup, batches[:1], momentum, temperature)

        jobs = {f"ours[{p}]": (lambda t=t: time_ours(t, batches)) for p, t in trainers.items()}
        jobs["reference fp32"] = lambda: time_reference(setup, batches, momentum, temperature)
        jobs["loader"] = lambda: time_loader(first, args.loader_batches)
        rates: dict[str, list[float]] = {name: [] for name in jobs}
        order = list(jobs)
        shuffle = random.Random(0)
        for r in range(args.repeats):
            shuffle.shuffle(order)
            for name in order:
                rates[name].append(jobs[name]())
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in jobs), flush=True)

    reference = rates["reference fp32"]
    print(f"\n{'path':<18} {'img/s (median)':>15} {'min-max':>16} {'x reference':>12}")
    for name, values in rates.items():
        ratio = (
            ""
            if name == "loader"
            else f"{statistics.median(v / r for v, r in zip(values, reference, strict=True)):.2f}"
        )
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"{name:<18} {statistics.median(values):>15.1f} {spread:>16} {ratio:>12}")
    step = statistics.median(rates[f"ours[{args.precision[0]}]"])
    loader = statistics.median(rates["loader"])
    verdict = "keeps up" if loader >= step else "is the bottleneck"
    print(
        f"\nloader {loader:.1f} img/s vs step {step:.1f} img/s: the loader {verdict} "
        "(timed apart; in training both share the cores)"
    )
    if args.json:
        from objcrop.commands.analyze_results import write_result

        rows = []
        for i, p in enumerate(args.precision):
            ours = rates[f"ours[{p}]"]
            rows.append(
                {
                    "condition": f"train.precision {p} (runs in {resolved[p]}), medians of {args.repeats} rounds",
                    "objcrop": statistics.median(ours),
                    "objcrop_range": [min(ours), max(ours)],
                    "reference": statistics.median(reference),
                    "reference_range": [min(reference), max(reference)],
                    "ratio": statistics.median(v / r for v, r in zip(ours, reference, strict=True)),
                    "loader": loader if i == 0 else None,  # the loader is timed once, with the first trainer
                }
            )
        settings = {k: getattr(args, k) for k in ("batch", "size", "threads", "queue", "steps", "repeats")}
        data = {"data": data_name, "settings": settings, "workers": args.workers, "loss_difference": diff, "rows": rows}
        write_result(args.json, "train-cpu", data)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
