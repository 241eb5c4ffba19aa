"""Unreadable training images are counted, never hidden: a tiny ``objcrop pretrain`` run over scenes with a few
corrupt JPEGs reports exactly how many distinct records it skipped, in its ``--json`` summary, its log, its
checkpoints and (for the kNN monitor's images) ``eval.csv``; with and without loader worker processes."""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from objcrop.cli import main
from objcrop.data.readers import load_records
from objcrop.ssl.checkpoint import load_checkpoint
from objcrop.ssl.sampler import EpochSampler
from tests.conftest import tiny_run_settings, write_run_yaml

BAD_JPEG = b"\xff\xd8\xff\xe0 a truncated JPEG"
# Training records made unreadable. 49, 50 and 0 in a row wrap around the end: sampling 49 or 50 skips up to
# 0 and trains on 1. 33 is the one left out of epoch 0's order (see below), so it is met in epoch 1 only.
BAD_TRAIN = [0, 20, 33, 49, 50]
BAD_TEST = [3]


@pytest.fixture(autouse=True)
def _torch_globals(restore_torch_globals):
    """Every test here trains: put torch's process-wide flags back afterwards."""


@pytest.fixture(scope="module")
def bad_scenes(tiny_scenes, tmp_path_factory) -> Path:
    """The tiny scenes (51 training, 13 test images) with BAD_TRAIN and BAD_TEST overwritten by a broken JPEG."""
    root = tmp_path_factory.mktemp("bad_scenes")
    shutil.copytree(tiny_scenes / "images", root / "images")
    for name in ("train.json", "test.json"):
        shutil.copy(tiny_scenes / name, root / name)
    for split, bad in (("train", BAD_TRAIN), ("test", BAD_TEST)):
        records = load_records("coco", annotations=str(root / f"{split}.json"), images=str(root / "images"))
        for i in bad:
            Path(records.path(i)).write_bytes(BAD_JPEG)
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_over_corrupt_jpegs_reports_exactly_the_distinct_records_it_skipped(
    bad_scenes, tmp_path, capsys, caplog, workers
):
    # The premise of the counts below: epoch 0 trains on 48 of the 51 records and leaves out 33 (and two good
    # ones); epoch 1 samples 33, and the others again.
    epoch_orders = []
    for epoch in (0, 1):
        sampler = EpochSampler(51, seed=0)
        sampler.set_epoch(epoch)
        epoch_orders.append(set(sampler.indices()[:48].tolist()))
    assert set(BAD_TRAIN) - epoch_orders[0] == {33} and set(BAD_TRAIN) <= epoch_orders[1]

    out = tmp_path / "run"
    knn = {"train.knn_every_epochs": 1, "train.knn_test_annotations": str(bad_scenes / "test.json")}
    settings = tiny_run_settings(
        bad_scenes, out, **{"train.workers": workers, "train.checkpoint_every_steps": 6, **knn}
    )
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", "--config", str(write_run_yaml(settings, tmp_path / "config.yaml")), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["steps"], summary["epochs"]) == (12, 2)  # trained to the end despite them
    assert summary["skipped_images"] == len(BAD_TRAIN)  # each counted once, though epoch 1 skips 4 of them again

    # The log says how many each epoch found and how many in all.
    trainer_lines = [r.getMessage() for r in caplog.records if r.name == "objcrop.ssl.trainer"]
    assert "rank 0: 4 unusable records skipped so far (4 new this epoch)" in trainer_lines
    assert "rank 0: 5 unusable records skipped so far (1 new this epoch)" in trainer_lines
    assert "5 unusable records were skipped in all (see the warnings of objcrop.crops.dataset)" in trainer_lines

    # The checkpoints name them: the end of epoch 0 the four it met, the last one all five.
    checkpoints = {int(p.stem.split("-")[1]): p for p in (out / "checkpoints").glob("ckpt-*.pt")}
    assert sorted(load_checkpoint(checkpoints[6])["unusable"].tolist()) == [0, 20, 49, 50]
    last = load_checkpoint(checkpoints[12])
    assert sorted(last["unusable"].tolist()) == BAD_TRAIN and last["skipped"] == len(BAD_TRAIN)

    # The kNN monitor reads the same training records and the test split: their unreadable images in eval.csv.
    with open(out / "eval.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["knn_images_skipped"]) for r in rows] == [("1", "6.0000"), ("2", "6.0000")]
    assert all(np.isfinite(float(r["knn_map@20"])) for r in rows)
