import json
import math
import re

import pytest

from objcrop.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_quick_demo_runs_every_step_and_writes_the_report(tmp_path):
    settings = DemoSettings.quick()
    settings.workers = 0
    summary = run_demo(tmp_path / "report", settings)

    for name in ("report.md", "summary.json", "crops.png", "recall.png", "loss.png", "map.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    assert set(summary["linear_map"]) == {"random init", "scene-scene", "obj-scene", "obj-obj-dilate"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in summary["linear_map"].values())
    assert all(r["steps"] == settings.steps for r in summary["pretrain"].values())
    on_disk = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert on_disk["linear_map"] == pytest.approx(summary["linear_map"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "obj-obj-dilate" in report and "mAP" in report
    # The report's table is the summary's numbers, and it says what one seed can show with this run's margins.
    rows = dict(re.findall(r"^\| ([\w -]+?) \| ([\d.]+) \|$", report, re.M))
    for arm, value in summary["linear_map"].items():
        assert float(rows[arm]) == round(value, 1), arm
    assert float(rows["chance"]) == round(summary["chance_map"], 1)
    gap = summary["linear_map"]["obj-obj-dilate"] - summary["linear_map"]["random init"]
    assert f"- obj-obj-dilate - random init: {gap:+.1f} mAP" in report
    assert "One seed per arm" in report
