"""Detection fine-tuning resumes exactly, refuses other settings, and the detector options reach the CLI."""

import pytest
import torch

import objcrop.evaluate.detection as detection
from objcrop.cli import main
from objcrop.evaluate.detection import DetectionConfig, DetectionDataset, train_detector
from objcrop.evaluate.detection_model import build_detector
from tests.evaluate.test_detection import _square_scenes

# 12 images in batches of 4: three iterations per epoch, a checkpoint every 2, so iteration 4 is mid-epoch.
CONFIG = dict(
    arch="resnet18", trainable_layers=5, norm="bn", box_head="2fc", fpn_channels=16, min_size=(48,), max_size=48,
    proposals_train=32, proposals_test=16, rois_per_image=8, epochs=2, batch_size=4, lr=0.01, warmup_iters=2,
    workers=0, device="cpu", checkpoint_every=2, hflip_prob=0.5,
)  # fmt: skip


_REAL_STEP = detection._train_step


class _Crash(Exception):
    pass


def _detector():
    torch.manual_seed(0)
    return build_detector("resnet18", 1, trainable_layers=5, norm="bn", box_head="2fc", fpn_channels=16,
                          min_size=48, max_size=48, proposals_test=16)  # fmt: skip


def _spy_steps(monkeypatch, crash_at: int | None = None) -> list:
    """Records the image indices and flips of every step; raises at step ``crash_at`` (0-based) if given."""
    seen = []

    def step(model, images, targets, optimizer, scaler, use_amp, it):
        if it == crash_at:
            raise _Crash
        seen.append((it, [int(t["index"]) for t in targets], [t["boxes"][0, 0].item() for t in targets]))
        return _REAL_STEP(model, images, targets, optimizer, scaler, use_amp, it)

    monkeypatch.setattr(detection, "_train_step", step)
    return seen


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights_and_batches(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    dataset = DetectionDataset(_square_scenes(tmp_path / "img", 12, seed=0), hflip_prob=0.5)
    config = DetectionConfig(**CONFIG)

    whole_model = _detector()
    whole_seen = _spy_steps(monkeypatch)
    whole = train_detector(whole_model, dataset, config, tmp_path / "whole.pt", progress=False)
    assert whole.iterations == 6 and [s[0] for s in whole_seen] == list(range(6))

    model = _detector()
    crashed_seen = _spy_steps(monkeypatch, crash_at=5)  # the last checkpoint was written after iteration 4
    with pytest.raises(_Crash):
        train_detector(model, dataset, config, tmp_path / "run.pt", progress=False)
    assert torch.load(tmp_path / "run.pt", weights_only=True)["iteration"] == 4

    torch.manual_seed(12345)  # the caller's random state must not matter to the resumed run
    resumed_model = _detector()
    resumed_seen = _spy_steps(monkeypatch)
    resumed = train_detector(resumed_model, dataset, config, tmp_path / "run.pt", progress=False)
    assert resumed.iterations == 6 and [s[0] for s in resumed_seen] == [4, 5]
    # The same images, flips and sample draws as the uninterrupted run: equal weights, bit for bit.
    assert crashed_seen[:4] + resumed_seen == whole_seen
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_other_settings_is_refused_naming_the_file(tmp_path):
    torch.set_num_threads(1)
    dataset = DetectionDataset(_square_scenes(tmp_path / "img", 4, seed=0))
    config = DetectionConfig(**{**CONFIG, "max_iters": 1})
    train_detector(_detector(), dataset, config, tmp_path / "run.pt", progress=False)
    other = DetectionConfig(**{**CONFIG, "max_iters": 1, "lr": 0.02})
    with pytest.raises(ValueError, match=r"run\.pt was written with other settings"):
        train_detector(_detector(), dataset, other, tmp_path / "run.pt", progress=False)
    # Not resuming starts over with the new settings.
    stats = train_detector(_detector(), dataset, other, tmp_path / "run.pt", resume=False, progress=False)
    assert stats.iterations == 1


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--box-head", "3fc"], "unknown box_head '3fc'"),
        (["--anchor-sizes", "8", "16", "32", "64", "0"], "anchor_sizes must be 5 positive sizes"),
        (["--fpn-channels", "0"], "fpn_channels must be positive"),
    ],
)
def test_detect_checks_the_model_options_before_reading_any_data(tmp_path, capsys, option, message):
    missing = str(tmp_path / "nowhere.json")  # never read: the options fail first
    args = ["detect", "--random", "--train-annotations", missing, "--train-images", str(tmp_path),
            "--test-annotations", missing, "--test-images", str(tmp_path), "--out", str(tmp_path / "o"),
            *option]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "nowhere.json" not in err and "Traceback" not in err


def test_detect_passes_the_model_options_to_the_config(tmp_path, monkeypatch):
    captured = {}

    def fake_run_detection(train, test, config, out, **kwargs):
        captured["config"] = config
        raise _Crash

    monkeypatch.setattr(detection, "run_detection", fake_run_detection)
    monkeypatch.setattr("objcrop.commands.detect._records", lambda *a: None)
    args = ["detect", "--random", "--train-annotations", "a", "--train-images", "b", "--test-annotations", "c",
            "--test-images", "d", "--box-head", "4conv1fc", "--anchor-sizes", "8", "16", "32", "64", "128",
            "--fpn-channels", "32"]  # fmt: skip
    with pytest.raises(_Crash):
        main(args)
    config = captured["config"]
    assert (config.box_head, config.anchor_sizes, config.fpn_channels) == ("4conv1fc", (8, 16, 32, 64, 128), 32)
