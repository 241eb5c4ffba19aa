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

End to end (``--end-to-end``, on by default): real JPEGs read from disk (``--images`` synthesized 640x480
textured scenes with boxes, written once to a temporary folder, or ``--scenes DIR`` to keep them), the
trainer's own DataLoader and ``train_step`` with ``train.workers`` loader processes, timed in steady state:

- random-tensor step: the same trainer stepping on views already on the device (the ceiling);
- loader path: ``crops.augment_on: loader``, views made in the workers (PIL);
- device path: ``crops.augment_on: device``, the workers decode and draw boxes, the views are made on the GPU;
- view maker alone, batched nvJPEG decode (``torchvision.io.decode_jpeg(device="cuda")``) alone, and, when
  NVIDIA DALI is importable (it is not a dependency), a DALI two-view MoCo-v2 pipeline as the anchor to beat.

Goals on one H200 with 16 cores: the device path at >= 85 % of the random-tensor step and >= 1.5x the loader path.

    python benchmarks/gpu_throughput.py              # about 4-7 minutes on one H100/H200 with 16 cores
    python benchmarks/gpu_throughput.py --no-reference                  # the end-to-end part only
    python benchmarks/gpu_throughput.py --quick      # tiny, runs on CPU too (crash test)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from objcrop.crops.augment import IMAGENET_MEAN, IMAGENET_STD
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


# -- end to end: real JPEGs, the trainer's loader and step ---------------------------------------------------
def _scene(job: tuple[str, int, int, int]) -> list[list[float]]:
    """Writes one textured 640x480-style JPEG scene with a few boxes; returns the boxes (xyxy)."""
    import PIL.Image
    import PIL.ImageDraw

    path, width, height, seed = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC)
    draw = PIL.ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(rng.integers(2, 7))):
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
        boxes.append([x, y, x + w, y + h])
    # Photo-like entropy: without grain the JPEGs decode several times faster than real photos.
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, (height, width, 1)).astype(np.int16)
    PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return boxes


def write_scenes(folder: Path, count: int, width: int, height: int, workers: int):
    """``count`` scenes in ``folder`` (kept if already there), as Records with their boxes as proposals."""
    import multiprocessing

    from objcrop.data.records import Record, Records

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"scene{k:05d}.jpg"), width, height, k) for k in range(count)]
    if workers > 1:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            all_boxes = pool.map(_scene, jobs, chunksize=16)
    else:
        all_boxes = [_scene(job) for job in jobs]
    recs = [
        Record(Path(path).name, width, height, boxes=np.array(b, np.float32), box_labels=np.zeros(len(b), np.int32))
        for (path, *_), b in zip(jobs, all_boxes, strict=True)
    ]
    return Records.from_records(recs, ["thing"], root=str(folder))


def repeated(records, n: int):
    """``n`` records cycling through ``records``: enough samples for the timed steps in one epoch (the files
    repeat, so after the first pass they come from the page cache)."""
    return records.subset(np.arange(n) % len(records))


def e2e_trainer(args: argparse.Namespace, batch: int, dataset, out: Path) -> Trainer:
    config = copy.deepcopy(DEFAULTS)
    config["method"] = {"name": "moco", "backbone": args.arch, "queue_size": 65536}
    config["optim"].update(batch_size=batch, epochs=1, lr=0.03)
    config["crops"]["size"] = args.size
    config["train"].update(
        device=args.device, tensorboard=False, progress=False, threads=None, workers=args.workers, out=str(out)
    )
    return Trainer(config, dataset=dataset)


def time_loop(trainer: Trainer, warmup: int, steps: int) -> float:
    """img/s of ``steps`` trainer steps on batches from the trainer's own DataLoader, after ``warmup`` steps."""
    device = trainer.env.device
    batches = iter(trainer._loader())
    for _ in range(warmup):
        trainer.train_step(next(batches))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    sync(device)
    rate = steps * trainer.batch_per_rank / (time.perf_counter() - start)
    del batches  # stops the workers
    return rate


def time_view_maker(dataset, batch: int, device: torch.device, repeats: int) -> float:
    """img/s of the view maker alone on one collated batch already on the device."""
    from objcrop.crops.device_dataset import collate_images

    data = collate_images([dataset[i] for i in range(batch)])
    images = data["images"].to(device)
    maker = dataset.view_maker()

    def step():
        maker(images, data["crops"], data["params"])

    return timed(step, device, 2, repeats, batch)[0]


def time_nvjpeg(paths: list[str], args: argparse.Namespace, batch: int, repeats: int) -> float | None:
    """img/s of batched nvJPEG decoding (torchvision) of ``batch`` files already in memory; None without CUDA."""
    if args.device == "cpu" or not torch.cuda.is_available():
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths[:batch]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return timed(
            lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), device, 2, repeats, len(encoded)
        )[0]


def time_dali(files: list[str], args: argparse.Namespace, batch: int, steps: int) -> float | None:
    """img/s of a DALI two-view MoCo-v2 pipeline (scene crops; no object-aware geometry) feeding the random-tensor
    step's trainer; None when DALI is not installed or there is no GPU."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError:
        return None
    if args.device == "cpu" or not torch.cuda.is_available():
        return None

    @pipeline_def(enable_conditionals=True)
    def two_views():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=True, name="files")
        images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
        views = []
        for _ in range(2):
            view = fn.random_resized_crop(images, size=args.size, random_area=[0.2, 1.0])
            if fn.random.coin_flip(probability=0.8):
                view = fn.color_twist(
                    view,
                    brightness=fn.random.uniform(range=[0.6, 1.4]),
                    contrast=fn.random.uniform(range=[0.6, 1.4]),
                    saturation=fn.random.uniform(range=[0.6, 1.4]),
                    hue=fn.random.uniform(range=[-36.0, 36.0]),  # degrees: 0.1 of the circle
                )
            if fn.random.coin_flip(probability=0.2):
                view = fn.hsv(view, saturation=0.0)
            if fn.random.coin_flip(probability=0.5):
                view = fn.gaussian_blur(view, window_size=23, sigma=fn.random.uniform(range=[0.1, 2.0]))
            views.append(
                fn.crop_mirror_normalize(
                    view, dtype=types.FLOAT, output_layout="CHW", mirror=fn.random.coin_flip(probability=0.5),
                    mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                )
            )  # fmt: skip
        return tuple(views)

    workers = max(args.workers, 1)
    pipe = two_views(batch_size=batch, num_threads=workers, device_id=torch.cuda.current_device(), seed=0)
    pipe.build()
    loader = DALIGenericIterator([pipe], ["v1", "v2"], reader_name="files")
    trainer = make_trainer(args, batch)
    kinds = torch.zeros(batch, 2, dtype=torch.long, device=trainer.env.device)

    def batches():
        while True:
            for out in loader:
                yield {"views": [out[0]["v1"], out[0]["v2"]], "kinds": kinds}

    feed = batches()
    return timed(lambda: trainer.train_step(next(feed)), trainer.env.device, 5, steps, batch)[0]


def device_path(args: argparse.Namespace, batch: int, dataset, out: Path) -> tuple[float, float, float]:
    """(random-tensor step, device path end to end, view maker alone) img/s of one trainer on ``dataset``."""
    trainer = e2e_trainer(args, batch, dataset, out)
    device = trainer.env.device
    data = random_batch(batch, args.size, device)
    ceiling = timed(lambda: trainer.train_step(data), device, args.e2e_warmup, args.e2e_steps, batch)[0]
    rate = time_loop(trainer, args.e2e_warmup, args.e2e_steps)
    view_rate = time_view_maker(dataset, batch, device, max(args.e2e_steps // 4, 1))
    return ceiling, rate, view_rate


def loader_path(args: argparse.Namespace, batch: int, dataset, out: Path) -> float:
    """Loader path end to end img/s (a fresh trainer: the device path's is freed first)."""
    free_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    return time_loop(e2e_trainer(args, batch, dataset, out), args.e2e_warmup, args.e2e_steps)


def end_to_end(args: argparse.Namespace, batch: int) -> list[tuple[str, float | None, str]]:
    """The end-to-end rows: (path, img/s or None, note)."""
    import tempfile

    from objcrop.crops.dataset import ObjectAwareDataset
    from objcrop.crops.device_dataset import DeviceViewDataset
    from objcrop.crops.policies import ViewPairPolicy
    from objcrop.proposals import open_proposals

    rows: list[tuple[str, float | None, str]] = []
    with tempfile.TemporaryDirectory(prefix="objcrop-e2e-") as tmp:
        folder = Path(args.scenes) if args.scenes else Path(tmp) / "scenes"
        t0 = time.perf_counter()
        scenes = write_scenes(folder, args.images, args.width, args.height, max(args.workers, 1))
        print(f"{args.images} scenes of {args.width}x{args.height} written in {time.perf_counter() - t0:.1f} s")
        records = repeated(scenes, batch * (args.e2e_warmup + args.e2e_steps + 2))
        store = open_proposals("gt", records)

        def dataset(kind):
            cls = DeviceViewDataset if kind == "device" else ObjectAwareDataset
            return cls(records, store, ViewPairPolicy("obj-obj-dilate"), size=args.size, seed=0)

        ceiling, device_rate, view_rate = device_path(args, batch, dataset("device"), Path(tmp) / "run")
        rows.append(("random-tensor step (ceiling)", ceiling, ""))
        loader_rate = loader_path(args, batch, dataset("loader"), Path(tmp) / "run-loader")
        rows.append(("loader path (views in workers)", loader_rate, f"{loader_rate / ceiling:.0%} of ceiling"))
        rows.append((
            "device path (views on device)", device_rate,
            f"{device_rate / ceiling:.0%} of ceiling, {device_rate / loader_rate:.2f}x loader",
        ))  # fmt: skip
        rows.append(("view maker alone", view_rate, "crop + MoCo-v2 of 2 views per image"))
        paths = [scenes.path(i) for i in range(len(scenes))]
        nvjpeg = time_nvjpeg(paths, args, batch, 5)
        rows.append(("nvJPEG batched decode alone", nvjpeg, "torchvision, CUDA only"))
        dali = time_dali(paths, args, batch, args.e2e_steps)
        rows.append(("DALI two-view MoCo-v2 (anchor)", dali, "not installed or no GPU" if dali is None else ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 128, 64], help="tried in order until one fits")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, batch 4, 1+1 steps: a crash test")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True, help="the step benchmark")
    parser.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True, help="real JPEGs")
    parser.add_argument(
        "--workers", type=int, default=max(len(os.sched_getaffinity(0)) - 1, 0), help="loader processes"
    )
    parser.add_argument("--images", type=int, default=2000, help="distinct JPEG scenes written for the end-to-end part")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--scenes", default=None, help="folder for the scenes (default: a temporary one)")
    parser.add_argument("--e2e-warmup", type=int, default=10)
    parser.add_argument("--e2e-steps", type=int, default=40)
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.size, args.batch, args.warmup, args.steps = "resnet18", 64, [4], 1, 1
        args.images, args.width, args.height, args.workers, args.e2e_warmup, args.e2e_steps = 8, 160, 120, 0, 1, 1
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    record = {"device": device, "torch": torch.__version__, "arch": args.arch, "size": args.size}

    rows, batch = None, args.batch[0]
    for batch in args.batch if args.reference else []:
        try:
            rows = run(args, batch)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch} does not fit; trying a smaller one")
        if rows is not None:
            break
        free_memory(torch.device("cuda"))  # after the except block, which kept the failed run's tensors alive
    if args.reference and rows is None:
        raise SystemExit("no batch size fits")
    record["batch"] = batch
    if rows is not None:
        print(f"\nMoCo-v2 {args.arch} at {args.size} px, batch {batch}, queue 65536, on {device}")
        print(f"{'path':<34} {'img/s':>9} {'peak GiB':>9} {'x ref fp32':>11}")
        reference = rows[0][1]
        for name, rate, peak in rows:
            print(f"{name:<34} {rate:>9.1f} {peak:>9.2f} {rate / reference:>11.2f}")
        print(f"{'anchor: official MoCo v2 per V100':<34} {MOCO_V2_V100:>9.1f}")
        record["rows"] = [
            {"path": n, "img_per_s": round(r, 1), "peak_gib": None if math.isnan(m) else round(m, 2)}
            for n, r, m in rows
        ]
    if args.end_to_end:
        e2e = end_to_end(args, batch)
        cores = len(os.sched_getaffinity(0))
        where = f"{args.workers} workers on {cores} cores, {device}"
        print(f"\nend to end: {args.width}x{args.height} JPEGs from disk, {where}")
        print(f"{'path':<34} {'img/s':>9}  note")
        for name, rate, note in e2e:
            print(f"{name:<34} {'-' if rate is None else f'{rate:.1f}':>9}  {note}")
        record["end_to_end"] = [
            {"path": n, "img_per_s": None if r is None else round(r, 1), "note": note} for n, r, note in e2e
        ]
    print(json.dumps(record))


if __name__ == "__main__":
    main()
