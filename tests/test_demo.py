import json
import math
import re

import pytest

from objcrop.cli import main
from objcrop.demo import DemoSettings, check_work_settings, run_demo


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


def test_the_work_folder_records_its_settings_and_reuse_needs_the_same(tmp_path):
    work = tmp_path / "work"
    check_work_settings(work, DemoSettings.quick())
    assert json.loads((work / "settings.json").read_text())["images"] == 48
    check_work_settings(work, DemoSettings.quick())  # the same settings: reused
    more_workers = DemoSettings.quick()
    more_workers.workers = 2
    check_work_settings(work, more_workers)  # loader workers do not change results
    other = DemoSettings.quick()
    other.seed, other.steps = 1, 5
    with pytest.raises(ValueError, match=r"other settings \(seed 0 -> 1, steps 3 -> 5\)"):
        check_work_settings(work, other)
    assert json.loads((work / "settings.json").read_text())["seed"] == 0  # the record is kept as it was


def test_a_work_folder_without_settings_is_refused_and_left_alone(tmp_path):
    (tmp_path / "work" / "scenes").mkdir(parents=True)
    (tmp_path / "work" / "scenes" / "test.json").write_text("{}")
    with pytest.raises(ValueError, match="holds files but no settings.json"):
        check_work_settings(tmp_path / "work", DemoSettings())
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["scenes"]
    (tmp_path / "work" / "settings.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable demo settings"):
        check_work_settings(tmp_path / "work", DemoSettings())


def test_demo_with_other_settings_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "report"
    check_work_settings(out / "work", DemoSettings.quick())
    assert main(["demo", "--out", str(out)]) == 2  # the full demo into a quick demo's folder
    err = capsys.readouterr().err
    assert "holds a demo made with other settings (" in err and "images 48 -> 2000" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "work").iterdir()) == ["settings.json"]
