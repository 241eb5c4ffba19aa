"""The command line's exit codes: expected failures are one line naming the path and exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from objcrop import cli
from objcrop.cli import main
from objcrop.commands import synth as synth_command
from objcrop.data.synth import synthesize

TINY_RUN = {
    "crops.size": 32,
    "method.backbone": "resnet18",
    "method.dim": 16,
    "method.queue_size": 64,
    "optim.batch_size": 8,
    "optim.max_steps": 1,
    "train.device": "cpu",
    "train.precision": "fp32",
    "train.workers": 0,
    "train.threads": 1,
    "train.tensorboard": False,
    "train.progress": False,
}


def write_config(path: Path, scenes: Path, out: Path) -> Path:
    nested: dict = {}
    settings = {**TINY_RUN, "data.annotations": str(scenes / "train.json"), "data.images": str(scenes / "images")}
    for dotted, value in {**settings, "train.out": str(out)}.items():
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(nested), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """20 synthetic scenes, a regular file to pass as --out, and a real one-step checkpoint."""
    tmp = tmp_path_factory.mktemp("cli")
    synthesize(tmp / "scenes", num_images=20, seed=0, size=40, progress=False)
    a_file = tmp / "a-file"
    a_file.write_text("not a folder")
    threads = torch.get_num_threads()
    try:
        assert main(["pretrain", "--config", str(write_config(tmp / "ok.yaml", tmp / "scenes", tmp / "run"))]) == 0
    finally:
        torch.set_num_threads(threads)
    checkpoint = sorted((tmp / "run" / "checkpoints").glob("ckpt-*.pt"))[-1]
    return {"tmp": tmp, "scenes": tmp / "scenes", "file": a_file, "checkpoint": checkpoint}


def _commands(w: dict) -> dict[str, list[str]]:
    scenes, a_file = w["scenes"], w["file"]
    data = ["--format", "coco", "--annotations", str(scenes / "train.json"), "--images", str(scenes / "images")]
    config = write_config(w["tmp"] / "to-a-file.yaml", scenes, a_file)
    return {
        "synth": ["synth", "--out", str(a_file), "--images", "2", "--no-progress"],
        "propose": ["propose", "--backend", "random", *data, "--out", str(a_file), "--no-progress"],
        "propose-gt": ["propose", "--backend", "gt", *data, "--out", str(a_file)],
        "propose-merge": ["propose", "--merge", *data, "--out", str(a_file)],
        "show": ["show", *data, "--proposals", "gt", "--out", str(a_file / "pairs.png")],
        "pretrain": ["pretrain", "--config", str(config)],
        "export": ["export", "--checkpoint", str(w["checkpoint"]), "--out", str(a_file / "r18.pth")],
        "export-detectron2": [
            "export",
            "--checkpoint",
            str(w["checkpoint"]),
            "--to",
            "detectron2",
            "--out",
            str(a_file / "r.pkl"),
        ],
    }


@pytest.mark.parametrize(
    "name", ["synth", "propose", "propose-gt", "propose-merge", "show", "pretrain", "export", "export-detectron2"]
)
def test_an_out_under_a_regular_file_is_exit_code_2_naming_it(workspace, name, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(_commands(workspace)[name])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(workspace["file"]) in err and "error" in err and "Traceback" not in err
    assert workspace["file"].read_text() == "not a folder"  # untouched


def test_from_a_shell_there_is_one_line_and_no_traceback(workspace):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "objcrop", "synth", "--out", str(workspace["file"]), "--images", "2", "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if not line.startswith("INFO")]
    assert len(lines) == 1 and lines[0].startswith("objcrop synth: error: ") and str(workspace["file"]) in lines[0]


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (KeyboardInterrupt(), 130, "objcrop synth: error: interrupted"),
        (
            PermissionError(13, "Permission denied", "/data/out"),
            2,
            "objcrop synth: error: /data/out: Permission denied",
        ),
        (IsADirectoryError(21, "Is a directory", "/data/x.png"), 2, "/data/x.png: Is a directory"),
        (OSError(28, "No space left on device"), 2, "No space left on device"),
        (OSError(18, "Invalid cross-device link", "/a", None, "/b"), 2, "/a -> /b: Invalid cross-device link"),
        (ValueError("bad value in c.yaml"), 2, "objcrop synth: error: bad value in c.yaml"),
        (FileNotFoundError(2, "image folder not found", "/imgs"), 2, "/imgs: image folder not found"),
    ],
)
def test_the_exit_code_table(monkeypatch, capsys, error, code, message):
    def fail(args):
        raise error

    monkeypatch.setattr(synth_command, "run", fail)
    try:
        got = main(["synth", "--out", "x"])
    except KeyboardInterrupt:  # escaping, it would end the whole pytest session
        pytest.fail("KeyboardInterrupt escaped cli.main")
    assert got == code
    assert message in capsys.readouterr().err


def test_a_config_error_is_exit_code_2(monkeypatch, capsys):
    from objcrop.ssl.config import ConfigError

    def fail(args):
        raise ConfigError("c.yaml: optim.lr: must be finite, got nan")

    monkeypatch.setattr(synth_command, "run", fail)
    assert main(["synth", "--out", "x"]) == 2
    assert "c.yaml: optim.lr" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(synth_command, "run", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["synth", "--out", "x"])
    assert all(issubclass(kind, BaseException) for kind, _, _ in cli.EXIT_CODES)


def test_a_store_with_nan_boxes_is_exit_code_2_in_show(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "a.jpg")
    data = ["--format", "folder", "--images", str(images)]
    assert main(["propose", "--backend", "random", "--opt", "n=4", *data, "--out", str(tmp_path / "s")]) == 0
    boxes = np.load(tmp_path / "s" / "boxes.npy")
    boxes[1, 2] = np.nan
    np.save(tmp_path / "s" / "boxes.npy", boxes)
    capsys.readouterr()
    assert main(["show", *data, "--proposals", str(tmp_path / "s"), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "boxes.npy row 1 (image 0)" in err and "is not finite" in err and not (tmp_path / "p.png").exists()


def _bad_inputs(scenes: Path, tmp: Path) -> dict[str, tuple[list[str], Path]]:
    """Per command: a command line with one bad input, and the path the error must name."""
    garbage = tmp / "weights.pth"
    garbage.write_bytes(b"not a torch file")
    missing, no_store = tmp / "missing.json", tmp / "no-store"
    images = ["--format", "coco", "--images", str(scenes / "images")]
    splits = [
        *images,
        "--train-annotations",
        str(scenes / "train.json"),
        "--test-annotations",
        str(scenes / "test.json"),
    ]
    detect = ["--train-annotations", str(scenes / "train.json"), "--train-images", str(scenes / "images"),
              "--test-annotations", str(scenes / "test.json"), "--test-images", str(scenes / "images")]  # fmt: skip
    return {
        "knn": (["knn", "--checkpoint", str(garbage), "--arch", "resnet18", *splits], garbage),
        "linear": (["linear", "--checkpoint", str(garbage), "--arch", "resnet18", *splits], garbage),
        "detect": (["detect", "--checkpoint", str(garbage), *detect, "--out", str(tmp / "det")], garbage),
        "supervised": (
            [
                "supervised",
                *images,
                "--train-annotations",
                str(missing),
                "--test-annotations",
                str(scenes / "test.json"),
                "--out",
                str(tmp / "s.pth"),
            ],
            missing,
        ),
        **{
            f"analyze {what}": (
                ["analyze", what, *images, "--annotations", str(scenes / "train.json"), "--proposals", str(no_store)],
                no_store,
            )
            for what in ("coverage", "recall")
        },
        "openimages-subset": (
            ["openimages-subset", "--boxes", str(tmp / "boxes.csv"), "--out", str(tmp / "o")],
            tmp / "boxes.csv",
        ),
    }


@pytest.mark.parametrize(
    "command", ["knn", "linear", "detect", "supervised", "analyze coverage", "analyze recall", "openimages-subset"]
)
def test_each_command_reports_bad_input_in_one_line_naming_it(command, tiny_scenes, tmp_path, capsys):
    argv, named = _bad_inputs(tiny_scenes, tmp_path)[command]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"objcrop {command.split()[0]}") and str(named) in lines[0], lines[0]
