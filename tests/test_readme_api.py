"""The README's Python API example runs as written, on an `objcrop synth` folder named ``scenes/``."""

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _api_example() -> str:
    section = README[README.index("## The Python API") : README.index("## Architecture")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section should hold one python example"
    return blocks[0]


def test_the_python_api_example_runs_as_written(tiny_scenes, tmp_path, monkeypatch, capsys):
    (tmp_path / "scenes").symlink_to(tiny_scenes, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_api_example(), "README.md (The Python API)", "exec"), namespace)  # noqa: S102 (our own README)
    views, kinds = namespace["views"], namespace["kinds"]
    assert sorted(kinds) == ["dilated", "object"] and len(views) == 2  # the view order is drawn
    assert all(isinstance(v, torch.Tensor) and v.shape == (3, 224, 224) for v in views)
    geometry = namespace["geometry"]
    assert sorted(geometry.kinds) == ["dilated", "object"] and len(geometry.crops) == 2 and not geometry.fallback
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("object crop scale: paper, S_min = 0.2 / ")  # calibrated by the dataset
    assert len(namespace["dataset"]) == len(namespace["records"])
