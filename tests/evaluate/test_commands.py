"""``objcrop linear`` / ``knn`` / ``supervised``: argument wiring and the --json shape."""

import json

import pytest
import torch

from objcrop.cli import main
from objcrop.data.synth import synthesize

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset_args(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, 40, size=64, progress=False)
    split_args = f"--train-annotations {out}/train.json --test-annotations {out}/test.json --images {out}/images"
    return ["--format", "coco", *split_args.split(), "--size", "16"]


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_linear_json(dataset_args, tmp_path, capsys):
    argv = ["linear", "--checkpoint", "random:resnet18", "--small-images", *dataset_args, "--cache-dir", str(tmp_path)]
    argv += ["--epochs", "3", "--lrs", "0.1", "--wds", "0", "--no-progress", "--json"]
    out = _json(capsys, argv)
    assert {"metric", "value", "classes_evaluated", "classes_skipped"} <= set(out)
    assert (
        out["metric"] == "mAP" and 0 <= out["value"] <= 100 and out["classes_evaluated"] + out["classes_skipped"] == 10
    )
    again = _json(capsys, argv)
    assert again["cache_hits"] == 2 and again["value"] == out["value"]

    # The knn command reads the same cache.
    knn_argv = ["knn", "--checkpoint", "random:resnet18", "--small-images", *dataset_args, "--cache-dir", str(tmp_path)]
    knn = _json(capsys, [*knn_argv, "--k", "5", "20", "--json"])
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


def test_command_choices_agree_with_the_library():
    import objcrop.commands.linear as command
    from objcrop.evaluate import features, linear

    assert command.TASKS == linear.TASKS and command.PROTOCOLS == linear.PROTOCOLS
    assert command.READOUT_MODES == features.READOUT_MODES
    assert (command.DEFAULT_LRS, command.DEFAULT_WDS) == (linear.DEFAULT_LRS, linear.DEFAULT_WDS)
