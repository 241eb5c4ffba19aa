"""The streaming dataset over webdataset shards: sample format, epochs, exact mid-epoch resume, bad
samples, and ``objcrop pretrain`` with ``data.format: webdataset`` end to end (and resumed)."""

import csv
import io
import json
import logging
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from objcrop.cli import main
from objcrop.crops.policies import KIND_CODES, ViewPairPolicy
from objcrop.crops.streaming import StreamingObjectAwareDataset
from objcrop.data.coco import read_coco
from objcrop.data.synth import synthesize
from objcrop.data.webdataset import read_webdataset, write_shards
from objcrop.proposals import ProposalStore
from objcrop.ssl.checkpoint import load_checkpoint
from objcrop.ssl.config import load_config
from objcrop.ssl.trainer import Trainer, _collate, pretrain
from tests.conftest import as_overrides

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """16 synthetic scenes of 64 px in 2 shards of 8."""
    scenes = tmp_path_factory.mktemp("scenes")
    synthesize(scenes, num_images=16, seed=0, size=64, progress=False)
    out = tmp_path_factory.mktemp("shards")
    write_shards(read_coco(scenes / "annotations.json", scenes / "images"), out, samples_per_shard=8)
    return out


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """The trainer sets process-wide torch flags; put them back for the other tests."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def dataset(shards, proposals="gt", **kwargs) -> StreamingObjectAwareDataset:
    kwargs = {"size": 32, "seed": 3, "shuffle_buffer": 4, **kwargs}
    return StreamingObjectAwareDataset.from_shards(shards, proposals, ViewPairPolicy("obj-obj-dilate"), **kwargs)


def batches(ds, steps: int, start: int = 0, batch: int = 3, workers: int = 0, epoch: int = 1) -> list[dict]:
    ds.set_epoch(epoch)
    ds.plan(steps, start, batch, workers)
    return list(DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=_collate, drop_last=True))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["index"], y["index"])
        and all(torch.equal(u, v) for u, v in zip(x["views"], y["views"], strict=True))
        for x, y in zip(a, b, strict=True)
    )


def test_samples_carry_the_map_style_fields_and_an_epoch_sees_each_sample_once(shards):
    ds = dataset(shards)
    samples = list(ds)  # no plan: one epoch of len(ds) samples in this process
    assert len(ds) == len(samples) == 16
    first = samples[0]
    assert {"views", "kinds", "index", "replaced", "fallback", "key"} <= set(first)
    assert [tuple(v.shape) for v in first["views"]] == [(3, 32, 32), (3, 32, 32)]
    pair = sorted([KIND_CODES["object"], KIND_CODES["dilated"]])
    assert all(sorted(s["kinds"].tolist()) == pair for s in samples)  # the policy's two kinds, in either order
    assert all(ds.store.key(s["index"]) == s["key"] and s["replaced"] == 0 for s in samples)
    assert sorted(s["key"] for s in samples) == [f"{i:06d}" for i in range(16)]
    assert [s["key"] for s in samples] != sorted(s["key"] for s in samples)  # shards and buffer shuffled


def test_an_epoch_depends_only_on_seed_and_epoch(shards):
    ds = dataset(shards)
    a, b = batches(ds, 4, epoch=1), batches(ds, 4, epoch=1)
    assert same_batches(a, b)
    assert not same_batches(a, batches(ds, 4, epoch=2))
    assert not same_batches(a, batches(dataset(shards, seed=4), 4, epoch=1))


@pytest.mark.parametrize(("workers", "start"), [(0, 2), (2, 1), (2, 2), (2, 3)])
def test_a_resumed_epoch_yields_exactly_the_remaining_batches(shards, workers, start):
    ds = dataset(shards)
    full = batches(ds, 5, workers=workers)
    assert len(full) == 5
    assert same_batches(batches(ds, 5, start=start, workers=workers), full[start:])


def test_with_two_workers_each_stream_reads_its_own_shard(shards):
    ds = dataset(shards)
    full = batches(ds, 4, batch=4, workers=2, epoch=0)
    first_shard = {f"{i:06d}" for i in range(8)}
    sides = [{ds.store.key(i) in first_shard for i in b["index"].tolist()} for b in full]
    assert all(len(s) == 1 for s in sides) and sides[0] != sides[1] and sides[0] == sides[2]


def test_processes_read_disjoint_shards(shards, tmp_path):
    """Two ranks over 4 shards of 4: in an epoch of 2 batches of 4 each rank reads its own 2 shards whole."""
    write_shards(read_webdataset(shards), tmp_path, samples_per_shard=4)
    ds = dataset(tmp_path)
    keys = []
    for rank in (0, 1):
        ds.set_epoch(0)
        ds.plan(2, 0, 4, workers=0, rank=rank, world_size=2)
        keys.append({s["key"] for s in ds})
    assert len(keys[0]) == len(keys[1]) == 8 and not keys[0] & keys[1]
    shard_of = {k: int(k) // 4 for k in keys[0] | keys[1]}
    assert len({shard_of[k] for k in keys[0]}) == 2


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_unusable_samples_are_replaced_by_the_next_and_logged(tmp_path, caplog):
    meta = json.dumps({"width": 40, "height": 30, "annotations": [{"bbox": [5, 5, 20, 15], "category_id": 1}]})
    members = []
    for key, image in [("a", jpeg("red")), ("b", b"broken bytes"), ("c", None), ("d", jpeg("blue"))]:
        if image is not None:
            members.append((f"{key}.jpg", image))
        members.append((f"{key}.json", meta.encode()))
    write_tar(tmp_path / "s.tar", members)
    ds = dataset(tmp_path, shuffle_shards=False, shuffle_buffer=0)
    assert ds.store.keys == ["a", "b", "d"]  # c has no image: the reader skipped it
    with caplog.at_level(logging.WARNING):
        samples = list(ds)
    # Positions 0..2 read raw samples a, b, c: b is undecodable and c is not in the store, so both
    # positions 1 and 2 are cut from d; the epoch (3 samples, the store's count) ends there.
    assert [(s["key"], s["replaced"]) for s in samples] == [("a", 0), ("d", 2), ("d", 1)]
    assert ds.skipped == 2  # each bad sample is decoded and logged once
    shard = str(tmp_path / "s.tar")
    assert f"skipping sample b of {shard}: " in caplog.text and "cannot identify image" in caplog.text
    assert f"skipping sample c of {shard}: no image member" in caplog.text


def test_a_store_of_other_shards_fails_after_max_tries(shards, tmp_path):
    other = ProposalStore.from_records(read_webdataset(shards).subset([0]))
    other = ProposalStore(other.boxes, other.scores, other.offsets, ["elsewhere"], other.sizes)
    ds = StreamingObjectAwareDataset([str(p) for p in sorted(shards.glob("*.tar"))], other, ViewPairPolicy("obj-scene"))
    ds.max_tries = 3
    with pytest.raises(RuntimeError, match="no usable sample in 3 in a row"):
        next(iter(ds))


def test_plans_are_checked(shards):
    ds = dataset(shards)
    with pytest.raises(ValueError, match="2 shards cannot feed 1 processes x 3 loader streams"):
        ds.plan(4, 0, 2, workers=3)
    with pytest.raises(ValueError, match="2 shards cannot feed 2 processes x 2 loader streams"):
        ds.plan(4, 0, 2, workers=2, rank=1, world_size=2)
    with pytest.raises(ValueError, match="invalid epoch plan"):
        ds.plan(4, start=5)
    with pytest.raises(ValueError, match="takes no data.annotations"):
        dataset(shards, annotations="train.json")


def settings(shards: Path, out: Path, **extra) -> list[str]:
    values = {
        "data.format": "webdataset",
        "data.images": str(shards / "shard-{000000..000001}.tar"),
        "crops.size": 32,
        "method.name": "moco",
        "method.backbone": "resnet18",
        "method.dim": 16,
        "method.hidden_dim": 32,
        "method.queue_size": 16,
        "optim.batch_size": 4,
        "optim.lr_reference_batch": 4,
        "optim.epochs": 2,
        "train.out": str(out),
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.channels_last": False,
        "train.workers": 0,
        "train.threads": 1,
        "train.deterministic": True,
        "train.checkpoint_every_steps": 1,
        "train.log_every_steps": 1,
        "train.tensorboard": False,
        "train.progress": False,
        **extra,
    }
    return as_overrides(values)


def log_losses(out: Path) -> list[str]:
    with open(out / "log.csv", newline="", encoding="utf-8") as f:
        return [r["loss"] for r in csv.DictReader(f)]


def test_pretrain_streams_shards_with_gt_boxes_and_with_a_proposal_store(shards, tmp_path):
    result = pretrain(load_config(None, settings(shards, tmp_path / "gt", **{"optim.max_steps": 2})))
    assert result.steps == 2 and math.isfinite(result.final_loss)
    store = tmp_path / "store"
    propose = ["propose", "--backend", "random", "--format", "webdataset", "--images", str(shards)]
    assert main([*propose, "--out", str(store), "--topk", "50", "--no-progress"]) == 0
    config = load_config(
        None, settings(shards, tmp_path / "run", **{"data.proposals": str(store), "optim.max_steps": 5})
    )
    result = pretrain(config)
    assert result.steps == 5 and result.epochs == 1  # 16 samples, batches of 4: 4 steps an epoch
    assert all(math.isfinite(float(v)) for v in log_losses(tmp_path / "run"))


def test_pretrain_resumed_mid_epoch_matches_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    """Two loader workers; interrupted after step 1 of the 4-step epoch 0 (so the resumed epoch starts at a batch
    of the second worker), resumed, 6 steps in all."""
    reference = tmp_path / "reference"
    pretrain(load_config(None, settings(shards, reference, **{"optim.max_steps": 6, "train.workers": 2})))
    config = load_config(None, settings(shards, tmp_path / "run", **{"optim.max_steps": 6, "train.workers": 2}))
    step = Trainer.train_step

    def interrupt_at_step_2(self, batch):
        if self.step == 1:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt")
    assert (state["epoch"], state["batches_done_in_epoch"]) == (0, 1)
    result = pretrain(config)
    assert Path(result.resumed_from).name == "ckpt-00000001.pt" and result.steps == 6
    assert log_losses(tmp_path / "run") == log_losses(reference)
    final = "ckpt-00000006.pt"
    a = load_checkpoint(tmp_path / "run" / "checkpoints" / final)["model"]
    b = load_checkpoint(reference / "checkpoints" / final)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
