"""The loader side of the device path: the loader path's crop boxes and kinds for a seed, parameters that are
a function of (seed, epoch, index), bad images skipped as by the loader path, batches, the views the two paths
make of one sample (PSNR with augmentations off), and training with ``crops.augment_on: device`` on CPU
(every method, view kinds, exact resumption, config checks)."""

import csv
import logging
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from objcrop.crops.augment import IMAGENET_MEAN, IMAGENET_STD
from objcrop.crops.dataset import ObjectAwareDataset
from objcrop.crops.device_dataset import DeviceViewDataset, collate_images, resolve_augment_on
from objcrop.crops.policies import ViewPairPolicy
from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.proposals import open_proposals
from objcrop.ssl.checkpoint import load_checkpoint
from objcrop.ssl.config import ConfigError, load_config
from objcrop.ssl.trainer import Trainer, pretrain
from tests.conftest import SHARED_DATA, needs_shared_data, run_config, tiny_run_settings

COCO = SHARED_DATA / "coco128"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, num_images=12, seed=0, size=64, progress=False)
    return out


def scene_records(scenes: Path):
    records = load_records("coco", annotations=str(scenes / "train.json"), images=str(scenes / "images"))
    return records, open_proposals("gt", records)


def recorded_loader_crops(dataset: ObjectAwareDataset) -> list:
    """Spies on the loader path: the crop boxes it cuts, in call order."""
    seen, cut = [], dataset.view_pair.cut_views

    def spy(image, crops):
        seen.append(np.array(crops))
        return cut(image, crops)

    dataset.view_pair.cut_views = spy
    return seen


@pytest.mark.parametrize("policy", ["obj-obj-dilate", "obj-obj-shift", "obj-scene"])
def test_device_path_draws_the_loader_paths_crop_boxes_and_kinds_for_a_seed(scenes, policy):
    records, store = scene_records(scenes)
    loader = ObjectAwareDataset(records, store, ViewPairPolicy(policy), size=16, seed=5)
    device = DeviceViewDataset(records, store, ViewPairPolicy(policy), size=16, seed=5)
    seen = recorded_loader_crops(loader)
    for epoch in (0, 3):
        loader.set_epoch(epoch)
        device.set_epoch(epoch)
        for index in (0, 7, 9, 2):
            expected = loader[index]
            sample = device[index]
            np.testing.assert_array_equal(sample["crops"].numpy(), seen[-1])
            assert torch.equal(sample["kinds"], expected["kinds"])
            assert (sample["index"], sample["replaced"]) == (expected["index"], expected["replaced"])
    assert device.policy.resolved_object_scale == loader.policy.resolved_object_scale


def test_samples_are_a_function_of_seed_epoch_and_index(scenes):
    records, store = scene_records(scenes)

    def make():
        return DeviceViewDataset(records, store, ViewPairPolicy("obj-obj-dilate"), augment="byol", size=16, seed=3)

    a, b = make(), make()
    b.set_epoch(0)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]  # another order, another dataset object
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x["crops"], y["crops"]) and torch.equal(x["params"], y["params"])
        assert torch.equal(x["image"], y["image"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["params"], forward[0]["params"])
    assert not torch.equal(a[0]["crops"], forward[0]["crops"])
    other = DeviceViewDataset(records, store, ViewPairPolicy("obj-obj-dilate"), augment="byol", size=16, seed=4)
    assert not torch.equal(other[0]["params"], forward[0]["params"])


def test_sample_fields_and_batches(scenes):
    records, store = scene_records(scenes)
    dataset = DeviceViewDataset(records, store, ViewPairPolicy("obj-scene"), size=16, seed=0)
    sample = dataset[4]
    assert set(sample) == {"image", "crops", "params", "kinds", "index", "replaced", "fallback"}
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 64, 64)
    assert sample["crops"].shape == (2, 4) and sample["params"].shape == (2, 12)
    (batch,) = DataLoader(dataset, batch_size=5, sampler=[4, 0, 1, 2, 3], collate_fn=dataset.collate)
    assert batch["images"].shape == (5, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["sizes"].tolist() == [[64, 64]] * 5
    assert batch["crops"].shape == (5, 2, 4) and batch["params"].shape == (5, 2, 12)
    assert batch["index"].tolist() == [4, 0, 1, 2, 3] and batch["fallback"] == 0
    assert torch.equal(batch["crops"][0], sample["crops"])
    views = dataset.view_maker(channels_last=False).from_batch(batch, "cpu")
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16)] * 2
    # Made in a worker process (the padded batch is filled in shared memory): the same batch.
    (again,) = DataLoader(dataset, batch_size=5, sampler=[4, 0, 1, 2, 3], collate_fn=dataset.collate, num_workers=1)
    assert all(torch.equal(batch[k], again[k]) for k in ("images", "sizes", "crops", "params", "kinds", "index"))


def test_bad_images_are_skipped_counted_and_logged_as_by_the_loader_path(scenes, tmp_path, caplog):
    records, store = scene_records(scenes)
    bad = Path(records.path(1))
    broken = tmp_path / "images"
    broken.mkdir()
    for i in range(len(records)):
        src = Path(records.path(i))
        (broken / src.name).write_bytes(b"\xff\xd8\xffbroken" if src == bad else src.read_bytes())
    records = load_records("coco", annotations=str(scenes / "train.json"), images=str(broken))
    loader = ObjectAwareDataset(records, store, ViewPairPolicy("obj-scene"), size=16, seed=0)
    device = DeviceViewDataset(records, store, ViewPairPolicy("obj-scene"), size=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="objcrop.crops.dataset"):
        sample = device[1]
        expected = loader[1]
    assert (sample["index"], sample["replaced"]) == (expected["index"], expected["replaced"]) == (2, 1)
    assert device.skipped == loader.skipped == 1 and device.known_bad == {1}
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping record 1 ")]
    assert len(messages) == 2 and messages[0] == messages[1] and bad.name in messages[0]
    device[1]  # known bad: not read again
    assert device.skipped == 1


def test_augment_on_resolves_auto_by_the_training_device():
    assert resolve_augment_on("auto", torch.device("cuda", 0)) == "device"
    assert resolve_augment_on("auto", "cpu") == "loader"
    assert resolve_augment_on("auto") == "loader"
    assert resolve_augment_on("device", "cpu") == "device"
    assert resolve_augment_on("loader", "cuda") == "loader"
    with pytest.raises(ValueError, match="augment_on must be one of"):
        resolve_augment_on("gpu")


def test_device_dataset_rejects_unknown_presets(scenes):
    records, store = scene_records(scenes)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        DeviceViewDataset(records, store, ViewPairPolicy("obj-scene"), augment="moco-v3")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@needs_shared_data("coco128/annotations", "coco128/train2017")
def test_both_paths_make_the_same_views_of_coco_samples_with_augmentations_off():
    """Dataset + view maker against the loader dataset (no augmentation, normalised), unnormalised for the
    PSNR: at least 30 dB per view (measured: min 38.4 dB, mean 45.2 dB at 96 px)."""
    records = load_records(
        "coco", annotations=str(COCO / "annotations" / "instances_train2017.json"), images=str(COCO / "train2017")
    )
    store = open_proposals("gt", records)
    normalize_only = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    loader = ObjectAwareDataset(
        records, store, ViewPairPolicy("obj-obj-dilate"), transform=normalize_only, size=96, seed=1
    )
    device = DeviceViewDataset(records, store, ViewPairPolicy("obj-obj-dilate"), augment="none", size=96, seed=1)
    indices = list(range(0, 128, 16))
    batch = collate_images([device[i] for i in indices])
    ours = device.view_maker().from_batch(batch, "cpu")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    values = []
    for row, index in enumerate(indices):
        reference = loader[index]["views"]
        for v in range(2):
            values.append(psnr(ours[v][row] * std + mean, reference[v] * std + mean))
    assert min(values) >= 30.0, values


# -- in the trainer -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def train_scenes(tiny_scenes) -> Path:
    """64 scenes of 40 px: 51 training images, 6 batches of 8 per epoch."""
    return tiny_scenes


@pytest.fixture(autouse=True)
def _torch_globals(restore_torch_globals):
    """The training tests below change torch's process-wide flags: put them back afterwards."""


def tiny_config(scenes: Path, out: Path, method: str = "moco", **extra) -> dict:
    """A deterministic fp32 CPU run on the device path: ResNet-18 at 32 px, batch 8, 2 epochs of 6 steps."""
    device = {"crops.augment_on": "device", "crops.augment": "byol" if method == "byol" else "moco-v2"}
    settings = tiny_run_settings(scenes, out, method, **{**device, **extra})
    return run_config(settings)


def final_model(out: Path) -> dict:
    return load_checkpoint(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1])["model"]


def losses(out: Path) -> list[str]:
    with open(out / "log.csv", newline="", encoding="utf-8") as f:
        return [row["loss"] for row in csv.DictReader(f)]


@pytest.mark.parametrize(("method", "separate_heads"), [("moco", True), ("byol", False), ("densecl", True)])
def test_each_method_trains_on_the_device_path_on_cpu(train_scenes, tmp_path, method, separate_heads):
    config = tiny_config(train_scenes, tmp_path, method, **{"method.separate_heads": separate_heads})
    config["optim"]["max_steps"] = 2
    if method == "byol":
        config["optim"]["name"] = "lars"
    trainer = Trainer(config)
    assert isinstance(trainer.dataset, DeviceViewDataset) and trainer.view_maker is not None
    assert trainer.view_maker.preset.name == config["crops"]["augment"]
    result = trainer.fit()
    assert result.steps == 2 and math.isfinite(result.final_loss)
    heads = [k for k in load_checkpoint(result.checkpoint)["model"] if ".heads.1." in k]
    assert bool(heads) == separate_heads  # view kinds reach the heads


def test_auto_keeps_the_loader_path_on_cpu(train_scenes, tmp_path):
    trainer = Trainer(tiny_config(train_scenes, tmp_path, **{"crops.augment_on": "auto"}))
    assert type(trainer.dataset) is ObjectAwareDataset and trainer.view_maker is None


def test_resume_on_the_device_path_matches_the_uninterrupted_run(train_scenes, tmp_path, monkeypatch):
    """Interrupted after the step-4 checkpoint, resumed mid-epoch across the epoch boundary: same weights, same
    losses as an uninterrupted run; switching to the loader path on resume is refused by name."""
    reference = tmp_path / "reference"
    pretrain(tiny_config(train_scenes, reference, **{"optim.max_steps": 8}))
    run = tmp_path / "run"
    config = tiny_config(train_scenes, run, **{"optim.max_steps": 8})
    step = Trainer.train_step

    def interrupt_at_step_5(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config)
    monkeypatch.undo()
    result = pretrain(config)
    assert Path(result.resumed_from).name == "ckpt-00000004.pt" and result.steps == 8
    a, b = final_model(run), final_model(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(run) == losses(reference)
    with pytest.raises(ConfigError, match=r"crops\.augment_on: \"device\" -> \"loader\""):
        pretrain(tiny_config(train_scenes, run, **{"optim.max_steps": 9, "crops.augment_on": "loader"}))


def test_config_checks_augment_on(train_scenes, tmp_path):
    with pytest.raises(ConfigError, match="crops.augment_on: 'gpu' is not one of auto, loader, device"):
        tiny_config(train_scenes, tmp_path, **{"crops.augment_on": "gpu"})
    shards = tmp_path / "shards"
    shards.mkdir()
    with pytest.raises(ConfigError, match="crops.augment_on: streamed webdataset"):
        tiny_config(train_scenes, tmp_path, **{"data.format": "webdataset", "data.images": str(shards)})


def test_gpu_benchmark_end_to_end_part_runs_quick_on_cpu(capsys):
    """The end-to-end part of benchmarks/gpu_throughput.py: real JPEGs, both paths, the ceiling (a crash test)."""
    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_throughput.py"))
    script["main"](["--quick", "--device", "cpu", "--no-reference"])
    out = capsys.readouterr().out
    for row in (
        "random-tensor step \\(ceiling\\)",
        "loader path \\(views in workers\\)",
        "device path \\(views on device\\)",
    ):
        assert re.search(row + r" +\d+\.\d", out), row
    assert re.search(r"device path .* of ceiling, \d+\.\d\dx loader", out)


@pytest.mark.slow
def test_kill_9_mid_epoch_and_resume_on_the_device_path_matches_the_uninterrupted_run(train_scenes, tmp_path):
    """A CLI run on the device path with a DataLoader worker, killed after its step-4 checkpoint and resumed
    without workers, ends with the weights and losses of an uninterrupted in-process run."""
    reference = tmp_path / "reference"
    pretrain(tiny_config(train_scenes, reference, **{"optim.max_steps": 8}))
    run = tmp_path / "run"
    settings = tiny_config(train_scenes, run, **{"optim.max_steps": 8, "train.workers": 1})
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(settings), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = run / "checkpoints" / "ckpt-00000004.pt"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "objcrop", "pretrain", "--config", str(cfg)], stdout=log, stderr=log, env=env
        )
        deadline = time.monotonic() + 300
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not finished, (tmp_path / "killed.log").read_text()
    assert target.exists(), "no step-4 checkpoint within 300 s"
    for later in (run / "checkpoints").glob("ckpt-*.pt"):
        if int(later.stem.split("-")[1]) > 4:
            later.unlink()
    result = pretrain(load_config(cfg, ["train.workers=0"]))
    assert Path(result.resumed_from).name == "ckpt-00000004.pt" and result.steps == 8
    a, b = final_model(run), final_model(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(run) == losses(reference)
