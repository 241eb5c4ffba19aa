"""The pretraining loop: every method end to end on CPU, exact resumption (also after ``kill -9``),
non-finite losses, the DataLoader leaving the global RNG alone, runs of unusable records, output
folders checked before step 1, stale temp files, resuming with a changed config, and ``--json``."""

import csv
import json
import logging
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from objcrop import registry
from objcrop.cli import main
from objcrop.io import atomic_open
from objcrop.ssl.checkpoint import load_checkpoint
from objcrop.ssl.config import ConfigError, load_config
from objcrop.ssl.errors import NonFiniteLossError
from objcrop.ssl.moco import MoCoV2
from objcrop.ssl.monitors import Monitor
from objcrop.ssl.trainer import Trainer, pretrain
from tests.conftest import run_config, tiny_run_settings, write_run_yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def scenes(tiny_scenes) -> Path:
    """64 scenes of 40 px: 51 training images, so 6 batches of 8 per epoch."""
    return tiny_scenes


@pytest.fixture(autouse=True)
def _torch_globals(restore_torch_globals):
    """Every test here trains: put torch's process-wide flags back afterwards."""


tiny_settings = tiny_run_settings


def tiny_config(scenes: Path, out: Path, method: str = "moco", **extra) -> dict:
    settings = tiny_settings(scenes, out, method, **extra)
    return run_config(settings)


def log_rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def final_model(out: Path) -> dict:
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    return load_checkpoint(ckpts[-1])["model"]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def reference_run(scenes, tmp_path_factory) -> Path:
    """An uninterrupted 8-step MoCo run (crosses the epoch boundary after step 6)."""
    out = tmp_path_factory.mktemp("reference")
    # Checkpoints only at the epoch end and the last step: saving must not change the run.
    result = pretrain(tiny_config(scenes, out, **{"optim.max_steps": 8, "train.checkpoint_every_steps": 100}))
    assert result.steps == 8 and result.epochs == 1
    return out


@pytest.mark.parametrize("method", registry.METHODS.names())
@pytest.mark.parametrize("separate_heads", [False, True])
def test_each_method_trains_end_to_end(scenes, tmp_path, method, separate_heads):
    config = tiny_config(scenes, tmp_path, method, **{"method.separate_heads": separate_heads, "optim.max_steps": 2})
    if method == "byol":
        config["optim"]["name"] = "lars"
    result = pretrain(config)
    assert result.steps == 2
    assert math.isfinite(result.final_loss)
    assert Path(result.checkpoint).name == "ckpt-00000002.pt"
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 2 and state["batches_done_in_epoch"] == 2
    rows = log_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["lr"]) > 0  # the logged rate is the one the step used
    heads = [k for k in state["model"] if ".heads.1." in k]
    assert bool(heads) == separate_heads


# Runs ``objcrop pretrain`` and kills its own process (SIGKILL, no clean-up) right after the
# checkpoint of step argv[2]: a kill at a fixed point, not a race against a poll.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from objcrop.cli import main
from objcrop.ssl.trainer import Trainer

save = Trainer.save_checkpoint

def save_then_kill_9(self):
    path = save(self)
    if self.step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path

Trainer.save_checkpoint = save_then_kill_9
sys.exit(main(["pretrain", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
def test_resume_after_kill_9_mid_epoch_matches_uninterrupted_run(scenes, tmp_path, reference_run):
    """A CLI run killed right after its step-4 checkpoint, resumed, ends with the reference run's weights.

    The killed run uses a DataLoader worker and the resumed one none: samples depend only on
    (seed, epoch, index). The resumption starts mid-epoch (step 4 of 6) and crosses the epoch boundary.
    """
    settings = tiny_settings(scenes, tmp_path / "run", **{"optim.max_steps": 8, "train.workers": 1})
    cfg = write_run_yaml(settings, tmp_path / "config.yaml")
    script = tmp_path / "kill_after_checkpoint.py"
    script.write_text(KILL_AFTER_CHECKPOINT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(cfg), "4"], capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))
    assert checkpoints == ["ckpt-00000002.pt", "ckpt-00000004.pt"]

    result = pretrain(load_config(cfg, ["train.workers=0"]))
    assert Path(result.resumed_from).name == "ckpt-00000004.pt"
    assert result.steps == 8 and result.epochs == 1
    assert_same_state(final_model(tmp_path / "run"), final_model(reference_run))
    # The log is continued, not duplicated, and shows the reference run's losses.
    resumed, reference = log_rows(tmp_path / "run"), log_rows(reference_run)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [str(s) for s in range(1, 9)]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


def test_resume_from_epoch_end_checkpoint_matches_uninterrupted_run(scenes, tmp_path, reference_run, monkeypatch):
    """Interrupted right after the epoch-end checkpoint (step 6), the run resumes in epoch 1."""
    config = tiny_config(scenes, tmp_path, **{"optim.max_steps": 8, "train.checkpoint_every_steps": 100})
    step = Trainer.train_step

    def interrupt_at_step_7(self, batch):
        if self.step == 6:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000006.pt")
    assert (state["epoch"], state["batches_done_in_epoch"]) == (1, 0)

    result = pretrain(config)
    assert Path(result.resumed_from).name == "ckpt-00000006.pt"
    assert result.steps == 8
    assert_same_state(final_model(tmp_path), final_model(reference_run))


def test_no_resume_sets_old_checkpoints_aside(scenes, tmp_path, reference_run):
    config = tiny_config(scenes, tmp_path, **{"optim.max_steps": 1})
    pretrain(config)
    pretrain(config, resume=False)
    aside = list(tmp_path.glob("checkpoints.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "ckpt-00000001.pt").exists()
    assert (tmp_path / "checkpoints" / "ckpt-00000001.pt").exists()
    assert [r["step"] for r in log_rows(tmp_path)] == ["1"]


def test_loader_does_not_draw_from_the_global_torch_generator(scenes, tmp_path):
    """Otherwise a mid-epoch resume leaves the global stream (shuffle-BN's permutations) elsewhere."""
    trainer = Trainer(tiny_config(scenes, tmp_path, **{"train.workers": 1}))
    before = torch.get_rng_state()
    next(iter(trainer._loader()))
    assert torch.equal(torch.get_rng_state(), before)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(scenes, tmp_path, monkeypatch):
    forward = MoCoV2.forward
    calls = []

    def nan_at_third_step(self, batch):
        out = forward(self, batch)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MoCoV2, "forward", nan_at_third_step)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .*ckpt-00000002\.pt"):
        pretrain(tiny_config(scenes, tmp_path, **{"train.checkpoint_every_steps": 1}))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["ckpt-00000001.pt", "ckpt-00000002.pt"]


def test_a_non_finite_loss_is_exit_code_3_with_one_line_from_the_command(scenes, tmp_path, capsys):
    settings = tiny_settings(scenes, tmp_path / "run", **{"optim.lr": 1.0e12, "optim.warmup_epochs": 0})
    assert (
        main(["pretrain", "--config", str(write_run_yaml({**settings, "optim.max_steps": 6}, tmp_path / "c.yaml"))])
        == 3
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("objcrop pretrain: ") and "Traceback" not in lines[0], lines


def test_huge_learning_rate_is_caught_before_a_bad_checkpoint(scenes, tmp_path):
    """With lr 1e12 the weights blow up: either the loss or the checkpoint guard stops the run."""
    config = tiny_config(scenes, tmp_path, **{"optim.lr": 1.0e12, "optim.warmup_epochs": 0, "optim.max_steps": 6})
    with pytest.raises(NonFiniteLossError):
        pretrain(config)
    for path in (tmp_path / "checkpoints").glob("ckpt-*.pt"):
        model = load_checkpoint(path)["model"]
        assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point()), path


def test_non_finite_weights_are_not_saved(scenes, tmp_path, monkeypatch):
    after = MoCoV2.after_optimizer_step

    def poison_after_step_3(self, step, total_steps):
        stats = after(self, step, total_steps)
        if step == 2:  # 0-based: the third step
            with torch.no_grad():
                next(self.query_encoder.parameters()).fill_(float("inf"))
        return stats

    monkeypatch.setattr(MoCoV2, "after_optimizer_step", poison_after_step_3)
    with pytest.raises(NonFiniteLossError, match="NaN/inf values after step 3"):
        pretrain(tiny_config(scenes, tmp_path, **{"train.checkpoint_every_steps": 1}))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["ckpt-00000001.pt", "ckpt-00000002.pt"]


def test_gpu_throughput_benchmark_runs_quick_on_cpu(capsys):
    """The GPU benchmark's crash test: tiny settings, CPU; ours and the reference agree on the fp32 loss."""
    script = runpy.run_path(str(REPO / "benchmarks" / "gpu_throughput.py"))
    script["main"](["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    difference = float(re.search(r"\|difference\| = (\S+)", out).group(1))
    assert difference < 1e-4
    assert re.search(r"reference fp32 +\d", out) and re.search(r"ours \(\w+, \w+\) +\d", out)


def test_pretrain_command_passes_the_knn_monitor_and_the_loss_plot(scenes, tmp_path):
    """The trainer imports nothing from evaluate or analysis: ``objcrop pretrain`` hands it both monitors."""
    from objcrop.data.readers import load_records
    from objcrop.evaluate.backbone import load_backbone
    from objcrop.evaluate.knn import KNNMonitor

    out = tmp_path / "run"
    test_annotations = str(scenes / "test.json")
    knn = {"train.knn_every_epochs": 1, "train.knn_test_annotations": test_annotations, "train.keep_last": 6}
    settings = tiny_settings(scenes, out, **{"optim.max_steps": 12, **knn})
    assert main(["pretrain", "--config", str(write_run_yaml(settings, tmp_path / "config.yaml"))]) == 0
    with open(out / "eval.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["epoch"]) for r in rows] == [("6", "1"), ("12", "2")]
    # Each row is the kNN mAP of the weights saved at that epoch's end, not of other weights.
    images = str(scenes / "images")
    monitor = KNNMonitor(
        load_records("coco", annotations=str(scenes / "train.json"), images=images),
        load_records("coco", annotations=test_annotations, images=images),
        size=32,
    )
    for row in rows:
        backbone, _ = load_backbone(out / "checkpoints" / f"ckpt-{int(row['step']):08d}.pt")
        assert row["knn_map@20"] == f"{monitor(backbone)['knn_map@20']:.4f}", row
    assert all(math.isfinite(float(r["loss"])) for r in log_rows(out))  # the training log is untouched
    assert (out / "loss.png").stat().st_size > 0


class RecordingMonitor(Monitor):
    """Records the hooks the trainer calls, and reports a number every ``every`` epochs."""

    def __init__(self, name: str, every: int) -> None:
        self.name, self.every, self.calls = name, every, []

    def setup(self, trainer):
        self.calls.append(("setup", trainer.step))

    def on_epoch_end(self, trainer):
        self.calls.append(("epoch", trainer.epoch))
        return {} if trainer.epoch % self.every else {f"{self.name}_epoch": float(trainer.epoch)}

    def on_fit_end(self, trainer):
        self.calls.append(("end", trainer.step))


def test_monitors_get_setup_each_epoch_end_and_the_fit_end_and_share_eval_rows(scenes, tmp_path):
    every, second = RecordingMonitor("a", 1), RecordingMonitor("b", 2)
    pretrain(tiny_config(scenes, tmp_path, **{"optim.max_steps": 13, "optim.epochs": 3}), monitors=[every, second])
    assert every.calls == [("setup", 0), ("epoch", 1), ("epoch", 2), ("end", 13)]
    assert second.calls == every.calls
    with open(tmp_path / "eval.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    # Epoch 2 brought b's column: the header was widened, epoch 1's row keeps an empty cell.
    assert reader.fieldnames == ["step", "epoch", "a_epoch", "b_epoch"]
    assert [(r["epoch"], r["a_epoch"], r["b_epoch"]) for r in rows] == [("1", "1.0000", ""), ("2", "2.0000", "2.0000")]


def test_ddp_finds_unused_parameters_when_the_method_declares_them(scenes, tmp_path, monkeypatch):
    """DDP's find_unused_parameters follows SSLMethod.has_unused_parameters, not a config key."""
    trainer = Trainer(tiny_config(scenes, tmp_path, **{"method.separate_heads": False}))
    seen = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda module, **kw: seen.append(kw) or module)
    trainer._wrap_ddp(trainer.method)
    trainer.method.has_unused_parameters = True  # what separate heads declare
    trainer._wrap_ddp(trainer.method)
    assert [kw["find_unused_parameters"] for kw in seen] == [False, True]


def test_knn_without_a_monitor_is_a_warning_not_a_silent_no_op(scenes, tmp_path, caplog):
    config = tiny_config(
        scenes,
        tmp_path,
        **{"train.knn_every_epochs": 1, "train.knn_test_annotations": str(scenes / "test.json")},
    )
    with caplog.at_level(logging.WARNING, logger="objcrop.ssl.trainer"):
        Trainer(config)
    assert "train.knn_every_epochs is set but this Trainer got no monitors" in caplog.text


def test_knn_monitor_needs_a_test_split(scenes, tmp_path):
    with pytest.raises(ConfigError, match="train.knn_test_annotations"):
        tiny_config(scenes, tmp_path, **{"train.knn_every_epochs": 1})


# ------------------------------------------------------------- unusable records (a bad JPEG must not stop epoch 37)


@pytest.fixture(scope="module")
def scenes_with_30_bad(scenes, tmp_path_factory) -> tuple[Path, list[int]]:
    """The scenes with 30 training records in a row (10..39) replaced by corrupt JPEGs; their indices."""
    from objcrop.data.readers import load_records

    root = tmp_path_factory.mktemp("bad_scenes")
    shutil.copytree(scenes / "images", root / "images")
    shutil.copy(scenes / "train.json", root / "train.json")
    records = load_records("coco", annotations=str(root / "train.json"), images=str(root / "images"))
    bad = list(range(10, 40))
    for i in bad:
        Path(records.path(i)).write_bytes(b"\xff\xd8\xff\xe0 a truncated JPEG")
    return root, bad


def dataset_reads_of_bad_files(caplog) -> int:
    return sum(r.name == "objcrop.crops.dataset" and r.getMessage().startswith("skipping") for r in caplog.records)


def test_thirty_corrupt_jpegs_in_a_row_train_to_the_end_and_are_counted_once(scenes_with_30_bad, tmp_path, caplog):
    """The old dataset gave up after 10 bad records in a row with a RuntimeError. Epoch 1 runs in a resumed
    process: the checkpoint hands it the known-bad records, so none is read again."""
    root, bad = scenes_with_30_bad
    with caplog.at_level(logging.WARNING):
        first = pretrain(tiny_config(root, tmp_path, **{"optim.max_steps": 6}))  # epoch 0
    assert first.steps == 6 and first.skipped_images == 30
    assert dataset_reads_of_bad_files(caplog) == 30
    assert sorted(load_checkpoint(first.checkpoint)["unusable"].tolist()) == bad
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = pretrain(tiny_config(root, tmp_path, **{"optim.max_steps": 12}))  # epoch 1, resumed
    assert result.resumed_from and result.steps == 12 and result.epochs == 2
    assert result.skipped_images == 30
    assert dataset_reads_of_bad_files(caplog) == 0
    assert "30 unusable records were skipped in all" in caplog.text


@pytest.mark.parametrize("workers", [0, 1])
def test_a_dataset_without_any_usable_record_is_a_clear_cli_error(scenes, tmp_path, capsys, workers):
    root = tmp_path / "broken"
    shutil.copytree(scenes / "images", root / "images")
    for path in (root / "images").iterdir():
        path.write_bytes(b"not an image")
    settings = tiny_settings(
        scenes, tmp_path / "run", **{"data.images": str(root / "images"), "train.workers": workers}
    )
    assert main(["pretrain", "--config", str(write_run_yaml(settings, tmp_path / "config.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "objcrop pretrain: error: none of the 51 records can be used" in err
    assert "Traceback" not in err and "NoUsableImageError" not in err


# ------------------------------------------------------------------ output folders, stale temp files


def test_an_output_folder_that_cannot_be_created_fails_before_the_data_is_read(scenes, tmp_path, monkeypatch):
    """The checkpoint folder used to be made at the first save: every step before it was lost."""
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder goes", encoding="utf-8")
    import objcrop.ssl.trainer as trainer_module

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was built before the output folder was checked")

    monkeypatch.setattr(trainer_module, "build_dataset", no_dataset)
    with pytest.raises(ConfigError, match=rf"train.out: .*{re.escape(str(tmp_path / 'checkpoints'))}"):
        pretrain(tiny_config(scenes, tmp_path))
    assert not (tmp_path / "log.csv").exists()


def test_cli_exit_code_2_names_an_uncreatable_output_folder(scenes, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    cfg = write_run_yaml(tiny_settings(scenes, blocker / "run"), tmp_path / "config.yaml")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(blocker / "run") in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_step_1(scenes, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot be created or written to"):
            pretrain(tiny_config(scenes, tmp_path))
    finally:
        (tmp_path / "checkpoints").chmod(0o755)


def test_stale_checkpoint_temp_files_are_removed_on_start_and_nothing_else(scenes, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    killed_save = atomic_open(folder / "ckpt-00000004.pt", "wb")  # entered, never finished: as after kill -9
    killed_save.__enter__().write(b"half a checkpoint")
    (stale,) = folder.glob(".ckpt-*.tmp")
    others = ["notes.txt", "ckpt-00000004.pt.tmp", ".ckpt-4.pt.x.tmp", ".model.pt.abc.tmp", ".ckpt-00000004.pt.tmp"]
    for name in others:
        (folder / name).write_text("the user's", encoding="utf-8")
    (tmp_path / ".ckpt-00000001.pt.abcd1234.tmp").write_text("outside the checkpoint folder", encoding="utf-8")
    pretrain(tiny_config(scenes, tmp_path, **{"optim.max_steps": 1}))
    assert not stale.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([*others, "ckpt-00000001.pt"])
    assert (tmp_path / ".ckpt-00000001.pt.abcd1234.tmp").exists()


# ------------------------------------------------------------------ resuming with a changed config


@pytest.fixture(scope="module")
def two_step_run(scenes, tmp_path_factory) -> Path:
    """A finished 2-step run to resume from (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("two_steps")
    pretrain(tiny_config(scenes, out, **{"optim.max_steps": 2}))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_resume_refuses_changes_that_alter_the_samples_or_the_model_naming_each_key(scenes, tmp_path, two_step_run):
    out = copy_run(two_step_run, tmp_path)
    changed = {
        "optim.max_steps": 4,
        "data.annotations": str(scenes / "test.json"),
        "crops.delta": 0.2,
        "method.dim": 32,  # used to fail with a traceback in load_state_dict
        "optim.batch_size": 4,
        "train.seed": 1,
    }
    with pytest.raises(ConfigError) as err:
        pretrain(tiny_config(scenes, out, **changed))
    message = str(err.value)
    for line in (
        f'data.annotations: "{scenes / "train.json"}" -> "{scenes / "test.json"}"',
        "crops.delta: 0.1 -> 0.2",
        "method.dim: 16 -> 32",
        "optim.batch_size: 8 -> 4",
        "train.seed: 0 -> 1",
        "records -> ",
        "--no-resume",
    ):
        assert line in message, message
    assert "max_steps" not in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-00000002.pt"]


def test_resume_applies_a_changed_learning_rate(scenes, tmp_path, reference_run, monkeypatch, caplog):
    """--set optim.lr used to be ignored: the scheduler restored the checkpoint's base_lrs."""
    settings = {"optim.max_steps": 8, "train.checkpoint_every_steps": 2}
    step = Trainer.train_step

    def interrupt_at_step_3(self, batch):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(scenes, tmp_path, **settings))
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="objcrop.ssl.trainer"):
        result = pretrain(tiny_config(scenes, tmp_path, **settings, **{"optim.lr": 0.3}))
    assert result.steps == 8
    assert "optim.lr: 0.03 -> 0.3" in caplog.text and "base_lrs rebuilt: 0.03 -> 0.3" in caplog.text
    resumed, reference = log_rows(tmp_path), log_rows(reference_run)
    assert [r["lr"] for r in resumed[:2]] == [r["lr"] for r in reference[:2]]
    for new, old in zip(resumed[2:], reference[2:], strict=True):  # the same schedule, ten times higher
        assert float(new["lr"]) == pytest.approx(10 * float(old["lr"]), rel=1e-5)


def test_resume_applies_safe_changes_and_extends_a_finished_run(scenes, tmp_path, two_step_run, caplog):
    out = copy_run(two_step_run, tmp_path)
    changed = {"optim.max_steps": 4, "train.log_every_steps": 2, "train.keep_last": 1, "train.workers": 1}
    with caplog.at_level(logging.INFO, logger="objcrop.ssl.trainer"):
        result = pretrain(tiny_config(scenes, out, **changed))
    assert result.steps == 4
    for line in ("optim.max_steps: 2 -> 4", "train.log_every_steps: 1 -> 2", "train.keep_last: 3 -> 1"):
        assert line in caplog.text
    assert [r["step"] for r in log_rows(out)] == ["1", "2", "4"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-00000004.pt"]
    # The derived object scale is recorded, and ignored when comparing.
    saved = json.loads(load_checkpoint(out / "checkpoints" / "ckpt-00000004.pt")["config"])
    assert "object_scale_resolved" in saved["crops"]
    lo = saved["crops"]["object_scale_resolved"][0]
    assert "object crop scale: paper, S_min = 0.2 / " in caplog.text and f"-> [{lo:.4f}, 1]" in caplog.text  # logged


# ------------------------------------------------------------------ pretrain --json


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_pretrain_json_is_valid_for_an_already_finished_run(scenes, tmp_path, capsys):
    cfg = write_run_yaml(tiny_settings(scenes, tmp_path / "run", **{"optim.max_steps": 2}), tmp_path / "config.yaml")
    assert main(["pretrain", "--config", str(cfg), "--json"]) == 0
    first = strict_json(capsys.readouterr().out)
    assert main(["pretrain", "--config", str(cfg), "--json"]) == 0  # nothing left to train
    again = strict_json(capsys.readouterr().out)
    assert again["steps"] == 2 and again["final_loss"] == pytest.approx(first["final_loss"])
    # A checkpoint that does not record the loss (an older objcrop's) gives null, not NaN.
    path = tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt"
    state = load_checkpoint(path)
    del state["loss"]
    torch.save(state, path)
    assert main(["pretrain", "--config", str(cfg), "--json"]) == 0
    assert strict_json(capsys.readouterr().out)["final_loss"] is None
