"""The ``--quick`` modes of ``benchmarks/bench_quality.py``, ``bench_detect.py`` and ``gpu_quality.py`` run every step.

The scripts are imported from the benchmarks folder (they import ``bench_quality`` from next to them)
and their ``main`` is called in-process with a temporary output folder.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Imports a benchmark script by name, on one thread (the tests share 2 cores)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_bench_detect_quick_runs_three_starts_and_resumes(bench, tmp_path, capsys):
    bench_detect = bench("bench_detect")
    out = tmp_path / "bd"
    summary = bench_detect.main(["--quick", "--threads", "1", "--out", str(out)])
    rows = summary["results"]
    assert list(rows) == list(bench_detect.STARTS)
    assert rows["random init"]["weights"] is None
    for start in ("scene-scene", "obj-obj-dilate"):  # pretrained here, one checkpoint per SSL start
        assert Path(rows[start]["weights"]).is_file()
        assert Path(rows[start]["weights"]).is_relative_to(out / "pretrain" / f"{start}-seed0")
    assert {r["train_iters"] for r in rows.values()} == {3}
    assert {r["test_images"] for r in rows.values()} == {round(24 * 0.2)}
    assert len({r["checkpoint"] for r in rows.values()}) == 3  # one detector per start
    saved = json.loads((out / "detect.json").read_text())
    assert saved["config"]["norm"] == "bn" and saved["config"]["max_iters"] == 3  # the schedule every start shares
    report = (out / "detect.md").read_text()
    assert all(f"| {start} |" in report for start in bench_detect.STARTS)
    assert "Measured order by AP50: " in report

    result_file = tmp_path / "detect-synth.json"  # the README's result file, rendered by results_tables
    again = bench_detect.main(["--quick", "--threads", "1", "--out", str(out), "--json", str(result_file)])
    result = json.loads(result_file.read_text())
    assert result["kind"] == "detect" and result["settings"]["iters"] == 3 and result["commit"]
    assert {s: {k: r[k] for k in bench_detect.SHOWN} for s, r in result["results"].items()} == {
        s: {k: r[k] for k in bench_detect.SHOWN} for s, r in rows.items()
    }
    rendered = bench("results_tables").RENDERERS["detect"](result)
    assert all(f"| {start} |" in rendered for start in bench_detect.STARTS)
    for start, row in rows.items():  # finished runs are reused
        assert again["results"][start]["weights"] == row["weights"]
        assert {k: again["results"][start][k] for k in bench_detect.SHOWN} == {k: row[k] for k in bench_detect.SHOWN}
    capsys.readouterr()


def test_bench_detect_refuses_a_missing_checkpoint_before_any_work(bench, tmp_path, capsys):
    bench_detect = bench("bench_detect")
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit) as exit_info:
        bench_detect.main(["--out", str(tmp_path / "bd"), "--checkpoints", f"scene-scene={missing}"])
    assert exit_info.value.code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "bd").exists()
    with pytest.raises(SystemExit):
        bench_detect.parse_args(["--checkpoints", "supervised=x.pt"])
    assert "unknown start 'supervised'" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_quality_quick_pairs_two_seeds(bench, tmp_path, capsys):
    gpu_quality = bench("gpu_quality")
    out = tmp_path / "gq"
    summary = gpu_quality.main(["--quick", "--out", str(out)])
    results = summary["results"]
    assert set(results) == {"scene-scene", "obj-obj-dilate", "random init"}
    arm, base = results["obj-obj-dilate"]["32"], results["scene-scene"]["32"]
    assert len(arm) == len(base) == 2 and summary["stopped"] == ""
    (row,) = summary["paired"]
    assert row["pairs"] == 2 and row["diffs"] == pytest.approx([a - b for a, b in zip(arm, base, strict=True)])
    assert row["ci"][0] <= row["mean"] <= row["ci"][1]
    assert summary["plan"]["steps"] == 2 and summary["plan"]["calibration"]["steps"] == 2
    saved = json.loads((out / "gpu_quality.json").read_text())
    assert saved["paired"] == summary["paired"]
    report = (out / "gpu_quality.md").read_text()
    assert "| obj-obj-dilate - scene-scene | 32 px | 2 |" in report
    capsys.readouterr()


@pytest.mark.slow
def test_gpu_quality_time_guard_stops_after_a_complete_pair(bench, tmp_path, capsys):
    gpu_quality = bench("gpu_quality")
    summary = gpu_quality.main(["--quick", "--time-budget", "1", "--out", str(tmp_path / "gq")])
    assert summary["plan"]["steps"] == 1  # no time left after the calibration: the fewest steps
    assert summary["stopped"].startswith("seed 1 of 2")
    assert len(summary["results"]["obj-obj-dilate"]["32"]) == len(summary["results"]["scene-scene"]["32"]) == 1
    (row,) = summary["paired"]
    assert row["pairs"] == 1 and row["ci"] is None and row["p"] is None
    assert "stopped early" in (tmp_path / "gq" / "gpu_quality.md").read_text()
    capsys.readouterr()


def test_steady_rate_leaves_the_start_up_out(bench, tmp_path):
    gpu_quality = bench("gpu_quality")
    # 8 images per step; 10 s of start-up, then 4 steps per second: step 20 at 15 s, step 60 at 25 s.
    log = tmp_path / "log.csv"
    log.write_text(f"step,loss,img_per_s\n20,1.0,{20 * 8 / 15}\n40,1.0,{40 * 8 / 20}\n60,0.9,{60 * 8 / 25}\n")
    assert gpu_quality.steady_rate(log, batch_size=8) == pytest.approx(32.0)
    log.write_text("step,loss,img_per_s\n20,1.0,10.0\n")
    assert gpu_quality.steady_rate(log, batch_size=8) is None


@pytest.mark.slow
def test_bench_quality_quick_pairs_seeds_and_gives_a_readability_verdict(bench, tmp_path, capsys):
    bench_quality = bench("bench_quality")
    out = tmp_path / "bq"
    argv = ["--quick", "--datasets", "synth", "--arms", "scene-scene", "obj-obj-dilate", "--out", str(out)]
    # Any supervised value clears chance - 100: the SSL arms run, two seeds each, paired by seed.
    stored = bench_quality.main([*argv, "--readable-margin", "-100"])
    outcome = stored["outcomes"]["synth"]
    arm, base = outcome["results"]["obj-obj-dilate"]["64"], outcome["results"]["scene-scene"]["64"]
    assert len(arm) == len(base) == 2
    (row,) = outcome["paired"]
    assert (row["arm"], row["baseline"], row["pairs"]) == ("obj-obj-dilate", "scene-scene", 2)
    assert row["diffs"] == pytest.approx([a - b for a, b in zip(arm, base, strict=True)])
    assert json.loads((out / "quality.json").read_text())["outcomes"]["synth"]["results"] == outcome["results"]
    report = (out / "quality.md").read_text()
    assert "Readable: supervised" in report and "| obj-obj-dilate - scene-scene | 64 px | 2 |" in report
    assert report == bench_quality.report_from_json(out / "quality.json")
    assert (out / "quality-synth.png").stat().st_size > 0

    # No supervised value clears chance + 1000: not readable, the SSL arms are skipped, the references kept.
    result_file = tmp_path / "quality-unreadable.json"
    stored = bench_quality.main(
        [*argv, "--readable-margin", "1000", "--out", str(tmp_path / "unreadable"), "--json", str(result_file)]
    )
    results = stored["outcomes"]["synth"]["results"]
    result = json.loads(result_file.read_text())
    assert result["kind"] == "quality" and result["commit"] and result["outcomes"] == stored["outcomes"]
    assert bench("results_tables").RENDERERS["quality"](result) + "\n" == bench_quality.report_from_json(result_file)
    assert set(results) == {
        "random init",
        "supervised (same backbone), linear probe",
        "supervised (same backbone), own head",
    }
    assert "**Not readable**" in (tmp_path / "unreadable" / "quality.md").read_text()

    # A rerun into the same folder reuses the stored references instead of training the supervised backbone again.
    supervised = tmp_path / "unreadable" / "runs-synth" / "supervised.pth"
    written = supervised.stat().st_mtime_ns
    again = bench_quality.main([*argv, "--readable-margin", "1000", "--out", str(tmp_path / "unreadable")])
    assert again["outcomes"]["synth"]["results"] == results
    assert supervised.stat().st_mtime_ns == written
    # Other scene settings into the same folder would read the old scenes: refused, before any work.
    with pytest.raises(SystemExit, match="holds scenes made with"):
        bench_quality.main([*argv, "--out", str(tmp_path / "unreadable"), "--min-scale", "0.2"])
    capsys.readouterr()


def test_bench_quality_arms_of_one_seed_start_from_the_same_weights_and_sampler_order(
    bench, tiny_scenes, tmp_path, restore_torch_globals
):
    """What the paired statistics rest on: an arm's config differs from its baseline's only in the crops."""
    from objcrop.demo import DemoSettings
    from objcrop.ssl.trainer import Trainer

    bench_quality = bench("bench_quality")
    settings = DemoSettings(batch_size=8, steps=2, workers=0)
    stores = {"gt": "gt", "main": "gt"}

    def start(label: str, seed: int):
        config = bench_quality.arm_config(settings, tiny_scenes, stores, label, seed, tmp_path / f"{label}-{seed}")
        trainer = Trainer(config)
        trainer.sampler.set_epoch(0)
        return trainer.model.state_dict(), trainer.sampler.indices(), config

    scene, scene_order, scene_config = start("scene-scene", 0)
    obj, obj_order, obj_config = start("obj-obj-dilate", 0)
    other, other_order, _ = start("scene-scene", 1)
    assert scene_config["train"]["seed"] == obj_config["train"]["seed"] == 0
    assert scene_config["crops"]["policy"] != obj_config["crops"]["policy"]
    assert scene.keys() == obj.keys() and all(torch.equal(scene[k], obj[k]) for k in scene)
    assert list(scene_order) == list(obj_order)
    assert list(other_order) != list(scene_order)
    assert not all(torch.equal(scene[k], other[k]) for k in scene if k.endswith("weight"))


@pytest.mark.slow
def test_bench_train_writes_a_result_file_the_readme_renders(bench, tmp_path, capsys):
    bench_train = bench("bench_train")
    out = tmp_path / "train-cpu.json"
    args = ["--batch", "8", "--size", "32", "--queue", "64", "--steps", "1", "--repeats", "2", "--threads", "1"]
    bench_train.main([*args, "--workers", "0", "--loader-batches", "1", "--synth-images", "24", "--json", str(out)])
    assert "fp32 loss, ours vs reference on the same inputs" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["kind"] == "train-cpu" and result["workers"] == 0 and result["loss_difference"] < 1e-4
    (row,) = result["rows"]
    assert row["condition"].startswith("train.precision auto (runs in ")
    assert row["objcrop_range"][0] <= row["objcrop"] <= row["objcrop_range"][1] and row["loader"] > 0
    tables = bench("results_tables")
    assert "| train.precision auto" in tables.train_cpu_table(result)
