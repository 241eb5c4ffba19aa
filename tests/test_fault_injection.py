"""Fault injection: ``objcrop propose``, ``objcrop pretrain`` and ``objcrop detect`` killed with SIGKILL three
times in a row at seeded random points (mid-chunk, mid-step or mid-save), then run to the end, give exactly the
outputs of an uninterrupted run: the same proposal arrays, the same final weights (``torch.equal``), the same
training log and the same detection scores.

The helpers of the existing kill -9 tests are reused (tests/ssl/test_trainer.py, tests/proposals/test_builder.py).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from objcrop.cli import main
from objcrop.data.synth import synthesize
from objcrop.proposals import ProposalStore
from objcrop.ssl.config import load_config
from objcrop.ssl.trainer import pretrain
from tests.conftest import write_run_yaml

HERE = Path(__file__).resolve().parent
KILLS = 3


def _helpers(relative: str, name: str):
    """A test module of another folder, by path (tests/ssl is not a package, and ``ssl`` is taken)."""
    spec = importlib.util.spec_from_file_location(name, HERE / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trainer_tests = _helpers("ssl/test_trainer.py", "_fault_injection_trainer_helpers")
builder_tests = _helpers("proposals/test_builder.py", "_fault_injection_builder_helpers")

# `objcrop propose` with the random backend slowed down, so that a kill lands mid-run.
SLOW_PROPOSE = """
import sys, time
from objcrop.proposals.random_boxes import RandomBoxProposer

call = RandomBoxProposer.__call__
def slow(self, image):
    time.sleep(float(sys.argv[1]))
    return call(self, image)
RandomBoxProposer.__call__ = slow

from objcrop.cli import main
sys.exit(main(["propose", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """40 scenes of 40 px: 32 training images, 4 batches of 8 per epoch."""
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, num_images=40, seed=3, size=40, progress=False)
    return out


@pytest.fixture(autouse=True)
def _torch_globals(restore_torch_globals):
    """The pretrain test changes torch's process-wide flags: put them back afterwards."""


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, timeout: float = 300) -> bool:
    """Waits until ``ready()``, then ``delay`` seconds, then SIGKILLs ``proc``; True if it was still running."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return running


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        env.pop(launcher, None)  # this test is one single-machine run
    return env


@pytest.mark.slow
def test_propose_killed_three_times_then_finished_equals_an_uninterrupted_run(scenes, tmp_path):
    rng = np.random.default_rng(2024)
    script = tmp_path / "slow_propose.py"
    script.write_text(SLOW_PROPOSE, encoding="utf-8")
    data = ["--format", "coco", "--annotations", str(scenes / "annotations.json"), "--images", str(scenes / "images")]
    common = [*data, "--backend", "random", "--opt", "n=12", "--shard", "0/1", "--shard-size", "2", "--no-progress"]
    out = tmp_path / "killed"
    chunks = len(json.loads((scenes / "annotations.json").read_text())["images"]) // 2

    def finished_chunks() -> int:
        return len(list((out / "shards").glob("*.npz")))

    # Three kills after a seeded number of finished chunks (each further than the last), plus up to 50 ms.
    targets = np.sort(rng.choice(np.arange(1, chunks - 4), size=KILLS, replace=False))
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115 (shared by the three runs)
    with log:
        for target in targets:
            proc = subprocess.Popen(
                [sys.executable, str(script), "0.04", *common, "--out", str(out)],
                stdout=log,
                stderr=log,
                env=environment(),
            )
            delay = float(rng.uniform(0, 0.05))
            assert kill_when(proc, lambda t=int(target): finished_chunks() >= t, delay), (
                f"the run finished before its kill at chunk {target}: {(tmp_path / 'killed.log').read_text()}"
            )
    assert not (out / "meta.json").exists() and 0 < finished_chunks() < chunks

    subprocess.run([sys.executable, str(script), "0", *common, "--out", str(out)], env=environment(), check=True)
    assert main(["propose", *common, "--out", str(tmp_path / "clean")]) == 0
    builder_tests.assert_same_store(ProposalStore.open(out), ProposalStore.open(tmp_path / "clean"))


def newest_checkpoint_step(folder: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in folder.glob("ckpt-*.pt")]
    return max(steps, default=0)


@pytest.mark.slow
def test_pretrain_killed_three_times_then_finished_equals_an_uninterrupted_run(scenes, tmp_path, capsys):
    """6 steps (epoch 0 and half of epoch 1), a checkpoint every step; kills after seeded steps, landing
    mid-step, mid-save or (when the resumed run has already passed the next target) during start-up."""
    rng = np.random.default_rng(7)
    settings = trainer_tests.tiny_settings(
        scenes, tmp_path / "killed", **{"optim.max_steps": 6, "train.checkpoint_every_steps": 1, "train.keep_last": 2}
    )
    cfg = write_run_yaml(settings, tmp_path / "config.yaml")
    checkpoints = tmp_path / "killed" / "checkpoints"
    targets = np.sort(rng.choice(np.arange(1, 5), size=KILLS, replace=False))
    with open(tmp_path / "killed.log", "wb") as log:
        for target in targets:
            proc = subprocess.Popen(
                [sys.executable, "-m", "objcrop", "pretrain", "--config", str(cfg)],
                stdout=log,
                stderr=log,
                env=environment(),
            )
            delay = float(rng.uniform(0, 0.4))
            assert kill_when(proc, lambda t=int(target): newest_checkpoint_step(checkpoints) >= t, delay), (
                f"the run finished before its kill at step {target}: {(tmp_path / 'killed.log').read_text()}"
            )
    assert 0 < newest_checkpoint_step(checkpoints) < 6

    assert main(["pretrain", "--config", str(cfg), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["resumed_from"]
    assert not list(checkpoints.glob(".*.tmp")), "a killed save's temp file was left behind"

    reference = pretrain(load_config(cfg, [f"train.out={tmp_path / 'clean'}"]))
    assert reference.steps == 6 and not reference.resumed_from
    trainer_tests.assert_same_state(
        trainer_tests.final_model(tmp_path / "killed"), trainer_tests.final_model(tmp_path / "clean")
    )
    resumed, clean = trainer_tests.log_rows(tmp_path / "killed"), trainer_tests.log_rows(tmp_path / "clean")
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in clean]


def _checkpoints_written(path: Path, seen: set[tuple[int, int]]) -> int:
    """How many times ``path`` was replaced so far, over all runs, as seen by polling (an inode number can be
    reused by the next atomic save, so a save is told by its inode and modification time together)."""
    try:
        stat = os.stat(path)
        seen.add((stat.st_ino, stat.st_mtime_ns))
    except FileNotFoundError:
        pass
    return len(seen)


@pytest.mark.slow
def test_detect_killed_three_times_then_finished_equals_an_uninterrupted_run(scenes, tmp_path):
    """8 iterations (2 epochs of 4 batches), a checkpoint after each; SIGKILLs after seeded checkpoints."""
    import torch

    rng = np.random.default_rng(11)
    data = ["--train-annotations", str(scenes / "train.json"), "--train-images", str(scenes / "images"),
            "--test-annotations", str(scenes / "test.json"), "--test-images", str(scenes / "images")]  # fmt: skip
    common = ["detect", "--random", "--arch", "resnet18", *data, "--max-train-images", "16", "--max-test-images", "4",
              "--epochs", "2", "--batch-size", "4", "--min-size", "48", "--max-size", "48", "--fpn-channels", "16",
              "--proposals-train", "32", "--proposals-test", "16", "--workers", "0", "--threads", "1",
              "--checkpoint-every", "1", "--no-progress"]  # fmt: skip
    out = tmp_path / "killed"
    seen: set[tuple[int, int]] = set()
    targets = np.sort(rng.choice(np.arange(1, 7), size=KILLS, replace=False))
    with open(tmp_path / "killed.log", "wb") as log:
        for target in targets:
            proc = subprocess.Popen(
                [sys.executable, "-m", "objcrop", *common, "--out", str(out)], stdout=log, stderr=log, env=environment()
            )
            delay = float(rng.uniform(0, 0.3))
            assert kill_when(proc, lambda t=int(target): _checkpoints_written(out / "detector.pt", seen) >= t, delay), (
                f"the run finished before its kill at checkpoint {target}: {(tmp_path / 'killed.log').read_text()}"
            )
    killed_at = torch.load(out / "detector.pt", weights_only=True)["iteration"]
    assert 0 < killed_at < 8 and not (out / "metrics.json").exists()

    finish = subprocess.run(
        [sys.executable, "-m", "objcrop", *common, "--out", str(out)], env=environment(), capture_output=True, text=True
    )
    assert finish.returncode == 0, finish.stderr
    assert f"resumed detection fine-tuning from {out / 'detector.pt'} at iteration {killed_at}" in finish.stderr
    subprocess.run(
        [sys.executable, "-m", "objcrop", *common, "--out", str(tmp_path / "clean")], env=environment(), check=True
    )
    resumed = torch.load(out / "detector.pt", weights_only=True)
    clean = torch.load(tmp_path / "clean" / "detector.pt", weights_only=True)
    assert resumed["iteration"] == clean["iteration"] == 8
    for name, tensor in clean["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    scores = [json.loads((folder / "metrics.json").read_text()) for folder in (out, tmp_path / "clean")]
    same = ("AP", "AP50", "AP75", "APs", "APm", "APl", "iterations")
    assert {k: scores[0].get(k) for k in same} == {k: scores[1].get(k) for k in same}
