"""Exact resumption beyond MoCo fp32: BYOL (tau schedule, LARS state), DenseCL (global and dense queues) and
the grad scaler's state. Interrupted at a step (KeyboardInterrupt, as tests/ssl/test_trainer.py does) and
resumed from the checkpoint, a run ends tensor-equal to the uninterrupted one. The kill -9 mechanism itself
is covered by tests/ssl/test_trainer.py and tests/test_fault_injection.py (MoCo)."""

import csv
from pathlib import Path

import pytest
import torch

from objcrop.ssl.checkpoint import load_checkpoint
from objcrop.ssl.trainer import Trainer, pretrain
from tests.conftest import run_config, tiny_run_settings

STEPS, INTERRUPT_AT = 4, 2  # checkpoint after step 2, interrupted during step 3


@pytest.fixture(autouse=True)
def _torch_globals(restore_torch_globals):
    """Every test here trains: put torch's process-wide flags back afterwards."""


def _config(scenes: Path, out: Path, method: str, **extra) -> dict:
    settings = tiny_run_settings(scenes, out, method, **{"optim.max_steps": STEPS, **extra})
    return run_config(settings)


def _losses(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "log.csv", newline="", encoding="utf-8") as f:
        return [(r["step"], r["loss"], r.get("tau", "")) for r in csv.DictReader(f)]


def _final(out: Path) -> dict:
    return load_checkpoint(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1])


def _interrupted_then_resumed(config: dict, monkeypatch, before_resume=None) -> None:
    step = Trainer.train_step

    def interrupt(self, batch):
        if self.step == INTERRUPT_AT:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config)
    monkeypatch.setattr(Trainer, "train_step", step)
    if before_resume is not None:
        before_resume()
    result = pretrain(config)
    assert Path(result.resumed_from).name == f"ckpt-{INTERRUPT_AT:08d}.pt"
    assert result.steps == config["optim"]["max_steps"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.mark.parametrize(("method", "extra"), [("byol", {"optim.name": "lars"}), ("densecl", {})])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_scenes, tmp_path, monkeypatch, method, extra):
    """BYOL with LARS (its momentum buffers, the tau schedule's step) and DenseCL (both queues and pointers)."""
    reference = tmp_path / "reference"
    pretrain(_config(tiny_scenes, reference, method, **extra, **{"train.checkpoint_every_steps": 100}))
    run = tmp_path / "run"
    _interrupted_then_resumed(_config(tiny_scenes, run, method, **extra), monkeypatch)
    resumed, uninterrupted = _final(run), _final(reference)
    _assert_same(resumed["model"], uninterrupted["model"])
    buffers = [k for k, v in resumed["optimizer"]["state"].items() if "momentum_buffer" in v or "mu" in v]
    assert buffers, resumed["optimizer"]["state"].keys()
    for key in buffers:
        _assert_same(resumed["optimizer"]["state"][key], uninterrupted["optimizer"]["state"][key])
    assert _losses(run) == _losses(reference)
    if method == "byol":
        assert len({tau for _, _, tau in _losses(run)}) == STEPS  # tau moves every step
    else:
        assert int(resumed["model"]["dense_queue.ptr"]) == int(uninterrupted["model"]["dense_queue.ptr"]) > 0


def test_grad_scaler_state_is_saved_and_restored(tiny_scenes, tmp_path, monkeypatch):
    """fp16 (the only precision with an enabled scaler) needs a GPU, so here the trainer gets an enabled CPU
    scaler with fp32 steps. Its start scale 2**125 overflows the gradients: steps are skipped and the scale
    backs off, then grows again after two successful steps, so a resumed run that restarted the scaler would skip
    other steps and end elsewhere."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(
        torch.amp, "GradScaler", lambda device, enabled: real(device, init_scale=2.0**125, growth_interval=2)
    )
    reference = tmp_path / "reference"
    pretrain(_config(tiny_scenes, reference, "moco", **{"train.checkpoint_every_steps": 100}))
    run = tmp_path / "run"
    _interrupted_then_resumed(_config(tiny_scenes, run, "moco"), monkeypatch)
    saved = load_checkpoint(run / "checkpoints" / f"ckpt-{INTERRUPT_AT:08d}.pt")["scaler"]
    assert saved["scale"] < 2.0**125  # the scale has moved by the checkpoint: there is state to restore
    resumed, uninterrupted = _final(run), _final(reference)
    assert resumed["scaler"] == uninterrupted["scaler"]
    _assert_same(resumed["model"], uninterrupted["model"])
    assert _losses(run) == _losses(reference)


@pytest.mark.slow  # bf16 autocast on a CPU without native bf16: ~25 s
def test_precision_auto_keeps_the_checkpoints_choice(tiny_scenes, tmp_path, monkeypatch, caplog):
    """``auto`` chose bf16 (a CPU that reports native bf16); the run is resumed where ``auto`` would choose fp32:
    the resumed run keeps bf16 and ends as the uninterrupted bf16 run."""
    import objcrop.ssl.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_cpu_has_bf16", lambda: True)
    if trainer_module._resolve_precision("auto", torch.device("cpu")) != torch.bfloat16:
        pytest.skip("torch has no mkldnn: auto never picks bf16 on this CPU")
    settings = {"train.precision": "auto", "optim.max_steps": INTERRUPT_AT + 1}  # bf16 on this CPU is slow
    reference = tmp_path / "reference"
    pretrain(_config(tiny_scenes, reference, "moco", **settings, **{"train.checkpoint_every_steps": 100}))
    assert _final(reference)["precision"] == "bf16"

    run = tmp_path / "run"
    chosen = []
    fit = Trainer.fit

    def fit_and_record(self, resume=True):
        chosen.append(self.dtype)  # before the checkpoint is loaded
        result = fit(self, resume)
        chosen.append(self.dtype)
        return result

    def on_a_machine_without_bf16():  # where auto would choose fp32
        monkeypatch.setattr(trainer_module, "_cpu_has_bf16", lambda: False)
        monkeypatch.setattr(Trainer, "fit", fit_and_record)

    with caplog.at_level("WARNING", logger="objcrop.ssl.trainer"):
        _interrupted_then_resumed(_config(tiny_scenes, run, "moco", **settings), monkeypatch, on_a_machine_without_bf16)
    assert chosen == [None, torch.bfloat16]
    assert "keeping the checkpoint's bf16 (this machine would choose fp32)" in caplog.text
    _assert_same(_final(run)["model"], _final(reference)["model"])
    assert _losses(run) == _losses(reference)
