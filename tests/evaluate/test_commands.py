"""``objcrop linear`` / ``knn`` / ``supervised``: argument wiring and the --json shape."""

import json

import pytest
import torch

from objcrop.cli import main
from objcrop.data.readers import load_records
from objcrop.data.synth import synthesize
from objcrop.evaluate.knn import knn_probe
from objcrop.evaluate.linear import linear_probe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset_args(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, 40, size=64, progress=False)
    split_args = f"--train-annotations {out}/train.json --test-annotations {out}/test.json --images {out}/images"
    return ["--format", "coco", *split_args.split(), "--size", "16"]


def _splits(dataset_args):
    """The train and test Records the command line names."""
    args = dict(zip(dataset_args[::2], dataset_args[1::2], strict=True))
    read = {"images": args["--images"]}
    train = load_records("coco", annotations=args["--train-annotations"], **read)
    return train, load_records("coco", annotations=args["--test-annotations"], **read)


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_linear_json(dataset_args, tmp_path, capsys):
    argv = ["linear", "--checkpoint", "random:resnet18", "--small-images", *dataset_args, "--cache-dir", str(tmp_path)]
    argv += ["--epochs", "3", "--lrs", "0.1", "--wds", "0", "--no-progress", "--json"]
    out = _json(capsys, argv)
    assert {"metric", "value", "classes_evaluated", "classes_skipped"} <= set(out)
    # The numbers of the library call with the same arguments (the wiring passes every one of them).
    train, test = _splits(dataset_args)
    probe = dict(size=16, small_images=True, cache_dir=tmp_path, progress=False)
    expected = linear_probe("random:resnet18", train, test, epochs=3, lrs=(0.1,), wds=(0.0,), **probe).to_dict()
    same = ("metric", "value", "lr", "weight_decay", "val_value", "classes_evaluated", "classes_skipped", "grid")
    assert {k: out[k] for k in same} == {k: expected[k] for k in same} and out["cache_hits"] == 0
    again = _json(capsys, argv)
    assert again["cache_hits"] == 2 and again["value"] == out["value"]

    # The knn command reads the same cache.
    knn_argv = ["knn", "--checkpoint", "random:resnet18", "--small-images", *dataset_args, "--cache-dir", str(tmp_path)]
    knn = _json(capsys, [*knn_argv, "--k", "5", "20", "--json"])
    assert {"metric", "value", "classes_evaluated", "classes_skipped"} <= set(knn)  # the README's --json keys
    assert knn == knn_probe("random:resnet18", train, test, k=(5, 20), **probe).to_dict()
    assert knn["metric"] == "mAP" and knn["k"] == 5 and [r["k"] for r in knn["results"]] == [5, 20]


def test_supervised_json_and_its_file_feeds_linear(dataset_args, tmp_path, capsys):
    weights = tmp_path / "sup.pth"
    argv = ["supervised", *dataset_args, "--out", str(weights), "--small-images", "--epochs", "1", "--batch-size", "16"]
    argv += ["--probe-epochs", "3", "--no-progress", "--json"]
    out = _json(capsys, argv)
    assert out["metric"] == "mAP" and len(out["losses"]) == 1 and 0 <= out["head_value"] <= 100
    assert out["linear"]["value"] >= 0 and weights.is_file()
    # The sidecar carries the architecture, so linear needs no --arch.
    linear_argv = ["linear", "--checkpoint", str(weights), *dataset_args, "--epochs", "2", "--lrs", "0.1", "--wds", "0"]
    probe = _json(capsys, [*linear_argv, "--json"])
    assert probe["cache_hits"] == 2 and probe["feature_dim"] == 512


def test_bad_arguments_exit_with_a_message(dataset_args, capsys):
    assert main(["linear", "--checkpoint", "random:resnet18", *dataset_args[:4], "--json"]) == 2  # no --images
    assert "--images" in capsys.readouterr().err
    assert main(["linear", "--checkpoint", "missing.pth", "--arch", "resnet18", *dataset_args]) == 2
    assert "missing.pth" in capsys.readouterr().err


def _options(command: str) -> dict:
    """``{dest: (choices, default)}`` of the subcommand's arguments."""
    from objcrop.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest: (a.choices, a.default) for a in sub._actions}


def test_command_choices_and_defaults_come_from_the_library():
    from objcrop.data.readers import ANNOTATION_FILE_FORMATS, FORMATS
    from objcrop.evaluate import features, linear, metrics

    for command in ("linear", "knn", "supervised"):
        options = _options(command)
        assert options["task"][0] == metrics.TASKS and options["format"][0] == FORMATS
    linear_options = _options("linear")
    assert linear_options["protocol"][0] == linear.PROTOCOLS and linear_options["mode"][0] == features.READOUT_MODES
    assert linear_options["lrs"][1] == list(linear.DEFAULT_LRS) and linear_options["wds"][1] == list(linear.DEFAULT_WDS)
    assert _options("knn")["mode"][0] == features.READOUT_MODES
    # detect reads --train-annotations/--test-annotations: the formats that take an annotations file.
    assert _options("detect")["format"][0] == ANNOTATION_FILE_FORMATS == ("coco", "voc", "openimages", "yolo")


def test_building_the_parser_imports_neither_torch_nor_sklearn():
    import subprocess
    import sys

    code = "import sys; from objcrop.cli import build_parser; build_parser(); "
    code += "print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
