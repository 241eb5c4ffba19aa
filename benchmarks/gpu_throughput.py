"""GPU training throughput of MoCo-v2, ResNet-50 at 224 px: the fp32 reference step against objcrop's default path.

Baseline: ``reference_moco_v2_step``, written straight from the MoCo-v2 pseudocode (fp32, contiguous
memory, a Python loop for the momentum update). Ours: ``MoCoV2`` as the trainer runs it (bf16 autocast,
or fp16 with a grad scaler where bf16 is missing, channels_last, fused multi-tensor EMA). Both use
the same backbone, batch, queue and SGD settings, on random tensors already on the GPU, so the
numbers are the step alone (no data loading). Anchor: the official MoCo reports about 168 img/s
per V100 for ResNet-50 at 224 px.

    python benchmarks/gpu_throughput.py                 # on a GPU, about 2-3 minutes
    python benchmarks/gpu_throughput.py --quick         # tiny, also runs on CPU (crash check)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from objcrop.ssl.backbones import build_backbone
from objcrop.ssl.heads import MLPHead
from objcrop.ssl.moco import MoCoV2
from objcrop.ssl.reference import reference_moco_v2_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, iters: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def reference_setup(arch: str, batch: int, size: int, queue_size: int, device: torch.device):
    trunk, dim = build_backbone(arch)
    f_q = nn.Sequential(trunk, MLPHead(dim, dim, 128)).to(device)
    f_k = copy.deepcopy(f_q)
    for p in f_k.parameters():
        p.requires_grad_(False)
    queue = F.normalize(torch.randn(queue_size, 128, device=device), dim=1)
    opt = torch.optim.SGD(f_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    x_q = torch.randn(batch, 3, size, size, device=device)
    x_k = torch.randn(batch, 3, size, size, device=device)
    state = {"queue": queue}

    def step():
        _, state["queue"] = reference_moco_v2_step(f_q, f_k, state["queue"], x_q, x_k, opt, 0.999, 0.2)

    return step


def ours_setup(arch: str, batch: int, size: int, queue_size: int, device: torch.device, dtype):
    model = MoCoV2(arch, queue_size=queue_size, temperature=0.2, momentum=0.999).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    views = [
        torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]
    kinds = torch.full((batch, 2), 3, dtype=torch.long, device=device)
    batch_dict = {"views": views, "kinds": kinds}

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(batch_dict)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.after_optimizer_step(0, 1)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="resnet18, 64 px, batch 8, 3 iterations (CPU smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.arch, args.batch, args.size, args.queue, args.iters, args.warmup = "resnet18", 8, 64, 256, 3, 1

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
        torch.backends.cudnn.allow_tf32 = False
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        name = torch.cuda.get_device_name(device)
    else:
        dtype = torch.bfloat16
        name = "cpu"
    print(
        f"device: {name}; torch {torch.__version__}; {args.arch} at {args.size} px, batch {args.batch}, K={args.queue}"
    )

    rows = {}
    for label, make in (
        ("reference fp32 (pseudocode)", lambda: reference_setup(args.arch, args.batch, args.size, args.queue, device)),
        (
            f"objcrop default ({str(dtype).split('.')[-1]} + channels_last)",
            lambda: ours_setup(args.arch, args.batch, args.size, args.queue, device, dtype),
        ),
        (
            "objcrop fp32 + channels_last",
            lambda: ours_setup(args.arch, args.batch, args.size, args.queue, device, None),
        ),
    ):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step = make()
        times = _time_steps(step, args.iters, args.warmup, device)
        median = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows[label] = {"img_per_s": args.batch / median, "ms_per_step": 1000 * median, "peak_gib": peak}
        del step

    base = next(iter(rows.values()))["img_per_s"]
    print("\n| path | img/s | ms/step | peak GiB | ratio to reference |\n|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['img_per_s']:.0f} | {r['ms_per_step']:.1f} | {r['peak_gib']:.1f} | "
            f"{r['img_per_s'] / base:.2f}x |"
        )
    print("\nanchor: official MoCo-v2, ResNet-50 224 px, about 168 img/s per V100")
    print(json.dumps({"device": name, "rows": rows}))


if __name__ == "__main__":
    main()
