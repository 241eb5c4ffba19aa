"""GPU training throughput of MoCo-v2 with ResNet-50 at 224 px: the fp32 reference step against ours.

Random input tensors already on the GPU (no data loading), one process, one GPU:

- reference fp32: :func:`objcrop.ssl.reference.reference_moco_v2_step` (written from the MoCo-v2
  pseudocode: fp32, contiguous, a Python loop for the momentum update), with TF32 off, as on the
  V100s of the official numbers;
- reference tf32: the same step with PyTorch's default of TF32 convolutions;
- ours: :meth:`objcrop.ssl.trainer.Trainer.train_step`, the trainer's default path
  (``train.precision=auto``: bf16 autocast, fp16 where bf16 is missing; channels_last; cuDNN autotuning);
- ours fp32: the same with ``train.precision=fp32`` (TF32 convolutions), to separate precision from the rest.

Each path: warm-up steps, then timed steps between ``torch.cuda.synchronize()`` calls; peak memory
from ``torch.cuda.max_memory_allocated``. Batch 256 if it fits, else the largest of 128/64 that does.
First it checks that ours and the reference give the same fp32 loss on the same inputs.

Anchor: the official MoCo v2 trains 200 ImageNet epochs in 53 h on 8 V100s at batch 256, i.e.
1.28M x 200 / (53 x 3600 s) / 8 = ~168 img/s per V100.

    python benchmarks/gpu_throughput.py              # about 2-4 minutes on one H100/H200
    python benchmarks/gpu_throughput.py --quick      # tiny, runs on CPU too (crash test)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import time

import torch
import torch.nn as nn

from objcrop.ssl.config import DEFAULTS
from objcrop.ssl.reference import reference_moco_v2_step
from objcrop.ssl.trainer import Trainer

MOCO_V2_V100 = 1.28e6 * 200 / (53 * 3600) / 8


class _Encoder(nn.Module):
    """A view encoder as a plain ``images -> embeddings`` module, for the reference step."""

    def __init__(self, encoder: nn.Module, kinds: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.kinds = kinds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder([x], self.kinds[: x.shape[0]])[0]


class _Sized:
    """Stands in for the dataset: the trainer only needs its length here."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def make_trainer(args: argparse.Namespace, batch: int, precision: str = "auto") -> Trainer:
    config = copy.deepcopy(DEFAULTS)
    config["method"] = {"name": "moco", "backbone": args.arch, "queue_size": 65536}
    config["optim"].update(batch_size=batch, epochs=1, lr=0.03)
    config["train"].update(device=args.device, precision=precision, tensorboard=False, progress=False, threads=None)
    return Trainer(config, dataset=_Sized(batch * 1000))


def random_batch(batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    views = [torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(2)]
    return {"views": views, "kinds": torch.zeros(batch, 2, dtype=torch.long, device=device)}


def reference_setup(trainer: Trainer, batch: dict) -> list:
    method = trainer.method
    kinds = batch["kinds"][:, :1]
    f_q = _Encoder(copy.deepcopy(method.query_encoder).to(memory_format=torch.contiguous_format), kinds)
    f_k = _Encoder(copy.deepcopy(method.key_encoder).to(memory_format=torch.contiguous_format), kinds)
    optimizer = torch.optim.SGD(f_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    return [f_q, f_k, method.queue.keys.clone(), optimizer]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, warmup: int, steps: int, batch: int) -> tuple[float, float]:
    """(img/s, peak GiB) of ``steps`` calls of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return rate, peak


def check_same_loss(trainer: Trainer, batch: dict) -> float:
    model = copy.deepcopy(trainer.method).to(memory_format=torch.contiguous_format).train()
    ours = model(batch)["loss"].item()
    f_q, f_k, queue, optimizer = reference_setup(trainer, batch)
    ref, _ = reference_moco_v2_step(
        f_q, f_k, queue, batch["views"][0], batch["views"][1], optimizer, model.momentum, model.temperature
    )
    return abs(ours - ref.item())


def run(args: argparse.Namespace, batch: int) -> list[tuple[str, float, float]]:
    trainer = make_trainer(args, batch)
    device = trainer.env.device
    data = random_batch(batch, args.size, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"fp32 loss, ours vs reference on the same inputs: |difference| = {check_same_loss(trainer, data):.2e}")
    rows = []
    momentum, temperature = trainer.method.momentum, trainer.method.temperature
    for name, tf32 in (("reference fp32", False), ("reference tf32", True)):
        if tf32 and device.type != "cuda":
            continue
        torch.backends.cudnn.allow_tf32 = tf32
        setup = reference_setup(trainer, data)

        def reference_step(setup=setup):
            _, setup[2] = reference_moco_v2_step(
                setup[0], setup[1], setup[2], data["views"][0], data["views"][1], setup[3], momentum, temperature
            )

        rows.append((name, *timed(reference_step, device, args.warmup, args.steps, batch)))
        del setup, reference_step
        free_memory(device)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, which the trainer keeps
    rows.append(time_trainer(trainer, data, args, batch))
    if device.type == "cuda":  # how much of the gain is precision: the trainer with train.precision=fp32
        del trainer
        free_memory(device)
        rows.append(time_trainer(make_trainer(args, batch, "fp32"), data, args, batch))
    return rows


def time_trainer(trainer: Trainer, data: dict, args: argparse.Namespace, batch: int) -> tuple[str, float, float]:
    precision = "fp32" if trainer.dtype is None else str(trainer.dtype).replace("torch.", "")
    name = f"ours ({precision}, {'channels_last' if trainer.channels_last else 'contiguous'})"
    return (name, *timed(lambda: trainer.train_step(data), trainer.env.device, args.warmup, args.steps, batch))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 128, 64], help="tried in order until one fits")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, batch 4, 1+1 steps: a crash test")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.size, args.batch, args.warmup, args.steps = "resnet18", 64, [4], 1, 1
    torch.manual_seed(0)

    rows = None
    for batch in args.batch:
        try:
            rows = run(args, batch)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch} does not fit; trying a smaller one")
        if rows is not None:
            break
        free_memory(torch.device("cuda"))  # after the except block, which kept the failed run's tensors alive
    if rows is None:
        raise SystemExit("no batch size fits")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"\nMoCo-v2 {args.arch} at {args.size} px, batch {batch}, queue 65536, on {device}")
    print(f"{'path':<34} {'img/s':>9} {'peak GiB':>9} {'x ref fp32':>11}")
    reference = rows[0][1]
    for name, rate, peak in rows:
        print(f"{name:<34} {rate:>9.1f} {peak:>9.2f} {rate / reference:>11.2f}")
    print(f"{'anchor: official MoCo v2 per V100':<34} {MOCO_V2_V100:>9.1f}")
    record = {"device": device, "torch": torch.__version__, "arch": args.arch, "size": args.size, "batch": batch}
    record["rows"] = [
        {"path": n, "img_per_s": round(r, 1), "peak_gib": None if math.isnan(m) else round(m, 2)} for n, r, m in rows
    ]
    print(json.dumps(record))


if __name__ == "__main__":
    main()
