"""train.precision: what ``auto`` resolves to per device and CPU, the grad scaler it enables, and channels_last."""

import pytest
import torch

import objcrop.ssl.trainer as trainer_module
from objcrop.ssl.trainer import Trainer, _cpu_has_bf16, _resolve_precision
from tests.conftest import run_config, tiny_run_settings

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(autouse=True)
def _torch_globals(restore_torch_globals):
    """The trainer tests here set torch's process-wide flags: put them back afterwards."""


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_a_gpu_is_bf16_where_supported_and_fp16_on_older_gpus(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert _resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize(
    ("mkldnn", "native_bf16", "expected"),
    [(True, True, torch.bfloat16), (True, False, None), (False, True, None), (False, False, None)],
)
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16_and_mkldnn(monkeypatch, mkldnn, native_bf16, expected):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
    monkeypatch.setattr(trainer_module, "_cpu_has_bf16", lambda: native_bf16)
    assert _resolve_precision("auto", CPU) is expected


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_named_precisions_are_taken_as_given(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("auto logic used"))
    monkeypatch.setattr(trainer_module, "_cpu_has_bf16", lambda: pytest.fail("auto logic used"))
    assert _resolve_precision("fp32", device) is None
    assert _resolve_precision("bf16", device) is torch.bfloat16
    assert _resolve_precision("fp16", device) is torch.float16


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni", False),  # AVX-512 without its bf16 extension
        ("fpu avx2 avx512f avx512_bf16 avx512_fp16", True),
        ("fpu avx2 amx_bf16 amx_tile amx_int8", True),
        ("", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert _cpu_has_bf16(str(cpuinfo)) is expected


def test_a_machine_without_proc_cpuinfo_has_no_native_bf16(tmp_path):
    assert _cpu_has_bf16(str(tmp_path / "missing")) is False


def _trainer(scenes, out, monkeypatch, dtype=None, **extra) -> Trainer:
    monkeypatch.setattr(trainer_module, "_resolve_precision", lambda precision, device: dtype)
    settings = tiny_run_settings(scenes, out, "moco", **extra)
    return Trainer(run_config(settings))


@pytest.mark.parametrize(("dtype", "enabled"), [(torch.float16, True), (torch.bfloat16, False), (None, False)])
def test_the_grad_scaler_is_enabled_for_fp16_only(tiny_scenes, tmp_path, monkeypatch, dtype, enabled):
    trainer = _trainer(tiny_scenes, tmp_path, monkeypatch, dtype)
    assert trainer.dtype is dtype
    assert trainer.scaler.is_enabled() is enabled


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_puts_the_model_and_the_views_in_that_layout(tiny_scenes, tmp_path, monkeypatch, channels_last):
    trainer = _trainer(tiny_scenes, tmp_path, monkeypatch, **{"train.channels_last": channels_last})
    convs = [p for p in trainer.method.parameters() if p.dim() == 4]
    assert convs
    assert all(p.is_contiguous(memory_format=torch.channels_last) is channels_last for p in convs if p.shape[2] > 1)
    views = [torch.rand(2, 3, 16, 16) for _ in range(2)]
    batch = trainer._to_device({"views": views, "kinds": torch.zeros(2, 2, dtype=torch.long)})
    assert all(v.is_contiguous(memory_format=torch.channels_last) is channels_last for v in batch["views"])
    assert all(torch.equal(a, b) for a, b in zip(batch["views"], views, strict=True))
