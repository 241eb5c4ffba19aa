"""Checkpoints: atomic writes, keep-last-k, weights-only loading, falling back past damaged files,
the folder checked up front and the temp files of killed saves removed."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from objcrop.data.synth import synthesize
from objcrop.io import atomic_open, atomic_torch_save
from objcrop.ssl.checkpoint import Checkpointer, load_checkpoint
from objcrop.ssl.errors import CheckpointError
from objcrop.ssl.trainer import pretrain
from tests.conftest import run_config


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_keeps_the_newest_k_in_step_order_and_leaves_no_temp_files(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (5, 100, 20):  # numeric, not lexical, order decides
        ckpt.save(state(step), step)
    assert [p.name for p in ckpt.paths()] == ["ckpt-00000020.pt", "ckpt-00000100.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000020.pt", "ckpt-00000100.pt"]
    loaded, path = ckpt.load_latest()
    assert path.name == "ckpt-00000100.pt" and loaded["step"] == 100


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt-00000001.pt"
    atomic_torch_save(state(1), target)
    with pytest.raises(AttributeError):  # torch.save cannot pickle a local lambda: the write fails midway
        atomic_torch_save({"model": {}, "step": 2, "bad": lambda: 0}, target)
    assert load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001.pt"]


class Payload:
    """Not a tensor type: ``weights_only`` loading must refuse it rather than run its pickle code."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_loading_is_weights_only(tmp_path, capsys):
    path = tmp_path / "ckpt-00000001.pt"
    torch.save({"model": {}, "step": 1, "payload": Payload()}, path)
    with pytest.raises(
        CheckpointError,
        match="ckpt-00000001.pt is damaged or not a checkpoint: not a tensor file that loads without pickle",
    ):
        load_checkpoint(path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_foreign_and_missing_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks the 'model' and 'step'"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_truncated_newest_falls_back_with_a_logged_error(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        ckpt.save(state(step), step)
    truncate(tmp_path / "ckpt-00000003.pt")
    with caplog.at_level(logging.ERROR, logger="objcrop.ssl.checkpoint"):
        loaded, path = ckpt.load_latest()
    assert path.name == "ckpt-00000002.pt" and loaded["step"] == 2
    assert "ckpt-00000003.pt is damaged" in caplog.text and "falling back" in caplog.text


def test_all_damaged_is_an_error_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path)
    for step in (1, 2):
        ckpt.save(state(step), step)
        truncate(tmp_path / f"ckpt-{step:08d}.pt", keep=0.1)
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        ckpt.load_latest()
    assert Checkpointer(tmp_path / "empty").load_latest() is None


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path, caplog):
    scenes = tmp_path / "scenes"
    synthesize(scenes, num_images=24, seed=1, size=40, progress=False)
    settings = {
        "data.annotations": str(scenes / "train.json"),
        "data.images": str(scenes / "images"),
        "crops.size": 32,
        "method.backbone": "resnet18",
        "method.dim": 16,
        "method.hidden_dim": 32,
        "method.queue_size": 64,
        "optim.batch_size": 8,
        "optim.max_steps": 4,
        "train.out": str(tmp_path / "run"),
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.workers": 0,
        "train.threads": 1,
        "train.deterministic": True,
        "train.checkpoint_every_steps": 2,
        "train.tensorboard": False,
        "train.progress": False,
    }
    config = run_config(settings)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        pretrain(config)
        newest = tmp_path / "run" / "checkpoints" / "ckpt-00000004.pt"
        shutil.copy(newest, tmp_path / "uninterrupted.pt")
        truncate(newest)
        with caplog.at_level(logging.ERROR, logger="objcrop.ssl.checkpoint"):
            result = pretrain(config)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert "ckpt-00000004.pt is damaged" in caplog.text
    assert Path(result.resumed_from).name == "ckpt-00000002.pt" and result.steps == 4
    redone, reference = load_checkpoint(newest)["model"], load_checkpoint(tmp_path / "uninterrupted.pt")["model"]
    assert all(torch.equal(redone[k], reference[k]) for k in reference)


def test_stale_temp_files_of_killed_saves_are_removed_and_only_those(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(state(1), 1)
    killed = atomic_open(tmp_path / "ckpt-00000002.pt", "wb", fsync=True)  # a save killed before its rename
    killed.__enter__().write(b"partial")
    (stale,) = tmp_path.glob(".ckpt-00000002.pt.*.tmp")
    keep = [".ckpt-00000002.pt.tmp", "ckpt-00000003.pt.abc.tmp", ".ckpt-2.pt.abc.tmp", ".log.csv.abcd_123.tmp", "x.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"not objcrop's checkpoint temp file")
    (tmp_path / ".ckpt-00000005.pt.abcdefgh.tmp").mkdir()  # a folder is never removed
    assert ckpt.remove_stale_temp_files() == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*keep, "ckpt-00000001.pt", ".ckpt-00000005.pt.abcdefgh.tmp"]
    )
    assert Checkpointer(tmp_path / "absent").remove_stale_temp_files() == []


def test_prepare_creates_the_folder_or_names_it(tmp_path):
    Checkpointer(tmp_path / "a" / "checkpoints").prepare()
    assert (tmp_path / "a" / "checkpoints").is_dir() and not list((tmp_path / "a" / "checkpoints").iterdir())
    (tmp_path / "file").write_text("", encoding="utf-8")
    with pytest.raises(OSError, match=r"checkpoint folder .*file/checkpoints cannot be created or written to"):
        Checkpointer(tmp_path / "file" / "checkpoints").prepare()
