"""The README's result tables are the result files' tables, never numbers typed by hand."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("table", sorted(RESULTS.glob("quality-*.md")), ids=lambda p: p.stem)
def test_every_quality_table_row_is_in_the_readme_as_written(table):
    rows = [line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    assert rows, f"{table} holds no table"
    missing = [row for row in rows if row not in README]
    assert not missing, f"README rows differ from {table.name}: {missing[:3]}"


def test_the_stored_quality_tables_are_what_the_stored_json_gives():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for table in sorted(RESULTS.glob("quality-*.md")):
        assert bench.report_from_json(table.with_suffix(".json")) == table.read_text(encoding="utf-8"), table.name


def test_the_demo_table_is_the_stored_demo_summary():
    summary = json.loads((RESULTS / "demo-summary.json").read_text(encoding="utf-8"))
    section = README[README.index("### The demo") :]
    section = section[: section.index("\n### ", 1)]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| ([\w -]+?) \| ([\d.]+) \|", section, re.M)}
    for arm, value in summary["linear_map"].items():
        assert rows[arm] == round(value, 1), arm
    assert rows["chance"] == round(summary["chance_map"], 1)
    assert f"({summary['seconds'] / 60:.1f} min" in section
