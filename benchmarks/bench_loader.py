"""Host CPU per two-view sample: the loader path against the device path, in one process, on real JPEGs.

- loader path: :class:`~objcrop.crops.dataset.ObjectAwareDataset` (PIL decode, crop+resize, MoCo-v2
  augmentations, normalised float views) and the trainer's collate;
- device path: :class:`~objcrop.crops.device_dataset.DeviceViewDataset` (read, decode to ``uint8``, crop
  boxes and augmentation parameters) and its collate (the padded ``uint8`` batch); the views are made on
  the training device and cost the host nothing more;
- device path, decode on the device: read the file and draw the geometry only, which is what stays on the host
  when nvJPEG decodes (the GPU decode itself is not timed here: see ``benchmarks/gpu_throughput.py``).

CPU time is ``time.process_time()`` of this process, one torch thread (one loader worker's core); the two
paths alternate in rounds so that a busy machine slows both alike. ``--decoders`` also times the JPEG decoders
on the same files, and ``--compare-augment`` times ``kornia.augmentation`` against the view maker's ops
(the measurement behind the choice in :mod:`objcrop.crops.device_views`).

    python benchmarks/bench_loader.py                       # COCO-128 from shared/data, ~1-2 min
    python benchmarks/bench_loader.py --decoders --compare-augment
    python benchmarks/bench_loader.py --images DIR --annotations FILE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from objcrop.crops.dataset import ObjectAwareDataset
from objcrop.crops.decode import decode_image, pad_images, resolve_decoder
from objcrop.crops.device_dataset import DeviceViewDataset, collate_images
from objcrop.crops.device_views import AUGMENT_PRESETS, augment_views, crop_resize
from objcrop.crops.policies import ViewPairPolicy
from objcrop.data.images import load_image
from objcrop.data.readers import load_records
from objcrop.proposals import open_proposals
from objcrop.ssl.trainer import _collate

COCO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco128"


def cpu_ms_per_sample(make_batch, indices: list[int], batch: int) -> float:
    start = time.process_time()
    for k in range(0, len(indices) - batch + 1, batch):
        make_batch(indices[k : k + batch])
    done = (len(indices) // batch) * batch
    return (time.process_time() - start) / done * 1e3


def geometry_only(dataset: DeviceViewDataset, indices: list[int]) -> None:
    """What the host does when the device decodes: read the bytes, draw boxes and parameters."""
    for index in indices:
        with open(dataset.records.path(index), "rb") as f:
            torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        width, height = dataset.records.size(index)
        rng = np.random.default_rng([0, 0, index])
        dataset.policy.sample(width, height, dataset.store.boxes_of(index), rng)
        dataset.preset.draw(np.random.default_rng(int(rng.integers(2**62))))


def time_decoders(paths: list[str]) -> dict[str, float]:
    def pil_tensor(p):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(load_image(p)).transpose(2, 0, 1)))

    decoders = {"PIL load_image": load_image, "PIL to uint8 [3,H,W]": pil_tensor}
    for name in ("torchvision", "torchcodec"):
        try:
            resolve_decoder(name)
        except ValueError:
            print(f"{name}: not available")
            continue
        decoders[f"{name} decode_jpeg"] = lambda p, name=name: decode_image(p, name)
    out = {}
    for name, fn in decoders.items():
        for p in paths[:4]:  # warm-up (imports, caches)
            fn(p)
        start = time.process_time()
        for p in paths:
            fn(p)
        out[name] = (time.process_time() - start) / len(paths) * 1e3
    return out


def compare_augment(paths: list[str], views: int, size: int, rounds: int) -> dict[str, float]:
    """Seconds per batch of ``views`` views: kornia.augmentation's MoCo-v2 pipeline against augment_views."""
    import kornia.augmentation as K

    images = [decode_image(p) for p in paths[: views // 2]]
    rng = np.random.default_rng(0)
    policy, empty = ViewPairPolicy("scene-scene"), np.zeros((0, 4), np.float32)
    crops = torch.stack([torch.from_numpy(policy.sample(i.shape[2], i.shape[1], empty, rng).crops) for i in images])
    x = crop_resize(pad_images(images), crops, size)
    params = torch.from_numpy(np.concatenate([AUGMENT_PRESETS["moco-v2"].draw(rng) for _ in range(len(images))]))
    kornia_moco = K.AugmentationSequential(
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((13, 13), (0.1, 2.0), p=0.5),
        K.RandomHorizontalFlip(),
    )
    candidates = {
        "kornia.augmentation": lambda: kornia_moco(x),
        "objcrop augment_views": lambda: augment_views(x.clone(), params),
    }
    out = {}
    for name, fn in candidates.items():
        fn()
        start = time.process_time()
        for _ in range(rounds):
            fn()
        out[name] = (time.process_time() - start) / rounds
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=str(COCO / "train2017"))
    parser.add_argument("--annotations", default=str(COCO / "annotations" / "instances_train2017.json"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--policy", default="obj-obj-dilate")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=128, help="samples per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoders", action="store_true", help="also time the JPEG decoders")
    parser.add_argument("--compare-augment", action="store_true", help="also time kornia.augmentation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    records = load_records("coco", annotations=args.annotations, images=args.images)
    store = open_proposals("gt", records)
    loader = ObjectAwareDataset(records, store, ViewPairPolicy(args.policy), size=args.size, seed=0)
    device = DeviceViewDataset(records, store, ViewPairPolicy(args.policy), size=args.size, seed=0)
    indices = [i % len(records) for i in range(args.samples)]
    paths = [records.path(i) for i in range(len(records))]
    print(f"{len(records)} images from {args.images}, {args.size} px views, policy {args.policy}")
    print(f"device path decoder: {device.decoder}")

    paths_to_time = {
        "loader path (decode + crop + MoCo-v2 + collate)": lambda idx: _collate([loader[i] for i in idx]),
        "device path (read + decode + geometry + collate)": lambda idx: collate_images([device[i] for i in idx]),
        "device path, decode on device (read + geometry)": lambda idx: geometry_only(device, idx),
    }
    for fn in paths_to_time.values():  # warm-up: imports, the page cache, the allocator
        fn(indices[: args.batch])
    times: dict[str, list[float]] = {name: [] for name in paths_to_time}
    for _ in range(args.rounds):
        for name, fn in paths_to_time.items():
            times[name].append(cpu_ms_per_sample(fn, indices, args.batch))
    medians = {name: float(np.median(t)) for name, t in times.items()}
    loader_ms = medians[next(iter(medians))]
    cpu = platform.processor() or platform.machine()
    print(f"\nhost CPU per two-view sample ({cpu}, 1 thread, median of {args.rounds} rounds)")
    print(f"{'path':<52} {'ms':>8} {'loader / this':>14}")
    for name, ms in medians.items():
        print(f"{name:<52} {ms:>8.2f} {loader_ms / ms:>14.1f}")
    record = {
        "size": args.size,
        "images": len(records),
        "cpu_ms_per_sample": {k: round(v, 3) for k, v in medians.items()},
    }

    if args.decoders:
        decoders = time_decoders(paths)
        print(f"\nJPEG decode, CPU ms per image ({len(paths)} images)")
        for name, ms in decoders.items():
            print(f"{name:<52} {ms:>8.2f}")
        record["decode_ms"] = {k: round(v, 3) for k, v in decoders.items()}
    if args.compare_augment:
        augment = compare_augment(paths, views=128, size=96, rounds=3)
        print("\nMoCo-v2 augmentations of 128 views at 96 px, CPU s per batch")
        for name, s in augment.items():
            print(f"{name:<52} {s:>8.3f}")
        record["augment_s_per_batch"] = {k: round(v, 4) for k, v in augment.items()}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
