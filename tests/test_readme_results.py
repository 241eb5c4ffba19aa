"""The README's result tables are renderings of the result files in benchmarks/results, never typed by hand."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, needs_shared_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text(encoding="utf-8")
DATA = SHARED_DATA


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _load("results_tables")
BLOCKS = tables.blocks(README)


def test_the_measured_results_section_has_its_tables_in_blocks():
    section = README[README.index("## Measured results") : README.index("## Evaluation protocols")]
    outside = tables.BLOCK.sub("", section)
    stray = [line for line in outside.splitlines() if line.startswith("|")]
    assert not stray, f"table rows outside a results block (typed by hand?): {stray[:3]}"
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_readme_block_is_the_rendering_of_its_result_file(name):
    assert BLOCKS[name] == "\n" + tables.render(name) + "\n", (
        f"README block {name!r} differs from benchmarks/results/{name}.json: "
        "run python benchmarks/results_tables.py --write"
    )


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.stem)
def test_every_result_file_has_provenance_and_is_shown(path):
    result = json.loads(path.read_text(encoding="utf-8"))
    for key in ("kind", "commit", "machine", "date", "command"):
        assert isinstance(result.get(key), str) and result[key].strip(), f"{path.name}: no {key}"
    assert result["kind"] in tables.RENDERERS, path.name
    assert path.stem in BLOCKS, f"{path.name} is in no README block"


FIDELITY_FIXES = "2026-12-01"  # results measured before then are of other crops than today's


def test_results_that_were_not_rerun_say_so():
    """A result from before the fidelity fixes, or under another torch than the project's, carries a note
    saying it was not re-run, and the README shows it (quality and demo files state their own commits)."""
    for name in BLOCKS:
        result = tables.load_result(name)
        torch = str(result.get("versions", {}).get("torch", ""))
        stale = result["date"] < FIDELITY_FIXES or not torch.startswith("2.14")
        if stale and result["kind"] not in ("quality", "demo"):
            assert "Not re-" in result.get("note", "") or "Not reproducible" in result.get("note", ""), name
            assert result["note"] in BLOCKS[name]
    assert "torch 2.11" in BLOCKS["train-gpu-h200"]


def test_the_quality_blocks_are_the_quality_benchmarks_own_report():
    bench = _load("bench_quality")
    names = [p.stem for p in sorted(RESULTS.glob("quality*.json"))]
    assert {"quality-synth", "quality-synth-5seeds", "quality-bn-leak", "quality-sprites"} <= set(names)
    for name in names:
        body = tables.render(name).split("\n\n", 1)[1]
        assert body == bench.report_from_json(RESULTS / f"{name}.json"), name


def test_a_changed_number_or_missing_field_is_caught(tmp_path):
    result = json.loads((RESULTS / "coverage-coco128.json").read_text(encoding="utf-8"))
    result["results"][0]["pairs"] += 1
    (tmp_path / "coverage-coco128.json").write_text(json.dumps(result))
    text = "x\n<!-- results: coverage-coco128 -->\n" + BLOCKS["coverage-coco128"] + "<!-- /results -->\ny\n"
    rewritten = tables.rewrite(text, tmp_path)
    assert rewritten != text and f"| {result['results'][0]['pairs']} |" in rewritten
    assert rewritten.startswith("x\n") and rewritten.endswith("<!-- /results -->\ny\n")
    assert tables.rewrite(rewritten, tmp_path) == rewritten

    del result["commit"]
    (tmp_path / "coverage-coco128.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match=r"coverage-coco128.json: missing provenance field\(s\) \['commit'\]"):
        tables.render("coverage-coco128", tmp_path)
    with pytest.raises(FileNotFoundError, match="absent"):
        tables.render("absent", tmp_path)
    with pytest.raises(ValueError, match="appears twice"):
        tables.blocks(text + text)


@needs_shared_data("coco128/annotations", "coco128/train2017")
@pytest.mark.parametrize("name", ["coverage-coco128", "coverage-coco128-min224"])
def test_the_stored_coverage_is_what_the_command_gives_now(name, tmp_path, capsys):
    """Re-runs the stored command on coco128 (about 2 s): a stale coverage table fails here."""
    from objcrop import cli

    stored = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    argv = shlex.split(stored["command"])[1:]
    out = tmp_path / "coverage.json"
    argv[argv.index("--out") + 1] = str(out)
    for flag in ("--annotations", "--images"):  # the command ran from the repository root
        argv[argv.index(flag) + 1] = str(ROOT / argv[argv.index(flag) + 1])
    assert cli.main(argv) == 0
    capsys.readouterr()
    fresh = json.loads(out.read_text(encoding="utf-8"))
    assert fresh["kind"] == "coverage" and fresh["settings"] == stored["settings"]
    assert all(fresh[key] for key in ("commit", "machine", "date", "command"))
    assert len(fresh["results"]) == len(stored["results"])
    for now, then in zip(fresh["results"], stored["results"], strict=True):
        assert now == {
            **then,
            "mean_gt_fraction": pytest.approx(then["mean_gt_fraction"], abs=1e-6),
            "ci95": pytest.approx(then["ci95"], abs=1e-6),
        }, then["policy"]
