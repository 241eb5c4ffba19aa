"""README: "Every long job shows a tqdm bar with its throughput and counts" -- each long command, run as a user
runs it (no --no-progress), draws a bar on stderr that says how far it is (n/total) and how fast (a rate)."""

import re

import pytest
import torch

from objcrop.cli import main
from tests.conftest import tiny_run_settings, write_run_yaml

torch.set_num_threads(1)
COUNT = re.compile(r"\b(\d+)/(\d+)\b")
RATE = re.compile(r"(\d+\.\d+|\?)\s?(img|it|step|batch|epoch)/s|\d+\.\d+s/(img|it|step|batch|epoch)")
LONG_JOBS = [
    "synth",
    "propose",
    "bing train",
    "pretrain",
    "linear",
    "linear --protocol paper",
    "knn",
    "supervised",
    "detect",
    "analyze coverage",
    "analyze recall",
]


def _commands(scenes, out) -> dict[str, tuple[list[str], str]]:
    """Each long job's tiny command line (paths without spaces) and the name its bar shows ("" for none)."""
    images = f"--format coco --images {scenes}/images"
    train, test = f"{scenes}/train.json", f"{scenes}/test.json"
    splits = f"{images} --train-annotations {train} --test-annotations {test} --size 16 --small-images"
    config = tiny_run_settings(scenes, out / "run", **{"optim.max_steps": 3, "train.progress": True})
    lines = {
        "synth": (f"synth --out {out}/synth --images 12 --size 40", "synth"),
        "propose": (f"propose --backend random {images} --annotations {train} --out {out}/store", "propose"),
        "bing train": (
            f"bing train {images} --annotations {train} --out {out}/bing.npz --sides 8,16 --colour-spaces rgb "
            "--min-boxes 1 --max-negatives 200",
            "",
        ),
        "pretrain": (f"pretrain --config {write_run_yaml(config, out / 'config.yaml')}", ""),
        "linear": (
            f"linear --checkpoint random:resnet18 {splits} --cache-dir {out}/cache --epochs 2 --lrs 0.1 --wds 0",
            "features",
        ),
        "linear --protocol paper": (
            f"linear --protocol paper --checkpoint random:resnet18 {splits} --paper-epochs 1 --batch-size 16",
            "",
        ),
        "knn": (f"knn --checkpoint random:resnet18 {splits} --cache-dir {out}/knn-cache --k 3", "features"),
        "supervised": (
            f"supervised {splits} --out {out}/sup.pth --epochs 1 --batch-size 16 --probe-epochs 2",
            "supervised",
        ),
        "detect": (
            f"detect --random --arch resnet18 --train-annotations {train} --train-images {scenes}/images "
            f"--test-annotations {test} --test-images {scenes}/images --max-train-images 4 --max-test-images 2 "
            f"--max-iters 2 --batch-size 2 --min-size 64 --max-size 64 --workers 0 --out {out}/det",
            "fine-tune",
        ),
        "analyze coverage": (
            f"analyze coverage {images} --annotations {train} --proposals {out}/store --pairs-per-image 2 "
            "--bootstrap 10",
            "coverage",
        ),
        "analyze recall": (f"analyze recall {images} --annotations {train} --proposals {out}/store", ""),
    }
    return {name: (line.split(), desc) for name, (line, desc) in lines.items()}


@pytest.mark.parametrize("command", LONG_JOBS)
def test_a_long_job_draws_a_bar_with_its_count_and_rate(command, tiny_scenes, tmp_path, capsys, restore_torch_globals):
    commands = _commands(tiny_scenes, tmp_path)
    if command.startswith("analyze"):
        assert main([*commands["propose"][0], "--no-progress"]) == 0
    argv, desc = commands[command]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    bars = [line for line in re.split(r"[\r\n]", err) if "|" in line and COUNT.search(line) and desc in line]
    assert bars, f"{command}: no progress bar {desc!r} on stderr:\n{err[-2000:]}"
    final = bars[-1]
    done, total = map(int, COUNT.search(final).groups())
    assert done == total > 0, final  # the last state drawn is the finished count
    assert RATE.search(final), f"{command}: no throughput in {final!r}"
