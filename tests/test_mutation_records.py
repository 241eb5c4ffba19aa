"""docs/testing.md's mutation table is the rendering of docs/mutation/*.json, and each record adds up."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
mutate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutate)
RECORDS = mutate.load_records()


def test_the_table_in_testing_md_is_the_rendering_of_the_records():
    text = mutate.TESTING_MD.read_text(encoding="utf-8")
    assert mutate.with_table(text) == text, "run: python tools/mutate.py --table"


def test_every_record_is_of_a_known_module_and_every_file_is_read():
    files = {p.stem for p in mutate.RECORDS.glob("*.json")}
    assert files == set(RECORDS) and set(RECORDS) <= set(mutate.MODULES)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_records_counts_add_up(name):
    r = RECORDS[name]
    module, tests = mutate.MODULES[name]
    assert (r["module"], r["tests"]) == (module, tests)
    assert r["counted"] == r["mutants"] - len(r["equivalent"])
    timeouts = len(r["timeout_or_suspicious"])
    assert r["killed"] + timeouts + len(r["survived"]) + len(r["no_tests"]) == r["counted"]
    assert r["rate"] == round(100 * (r["killed"] + timeouts) / r["counted"], 1)
    prefix = module.removesuffix(".py").replace("/", ".") + "."
    assert all(key.startswith(prefix) for key in [*r["survived"], *r["equivalent"]])
    assert set(r["equivalent"]) <= set(mutate.EQUIVALENT)
    assert list(r["survivor_diffs"]) == r["survived"]
    for key, diff in r["survivor_diffs"].items():
        signs = {line[:2] for line in diff.splitlines()}
        assert signs and signs <= {"- ", "+ "}, (key, diff)  # a deleted line has no "+"


def test_equivalent_mutants_name_a_module_that_is_mutated_and_give_a_reason():
    prefixes = tuple(m.removesuffix(".py").replace("/", ".") + "." for m, _ in mutate.MODULES.values())
    assert all(key.startswith(prefixes) and len(why) > 20 for key, why in mutate.EQUIVALENT.items())


def test_survivors_are_counted_by_function_and_method():
    keys = [
        "objcrop.boxes.x_iou__mutmut_3",
        "objcrop.boxes.x_iou__mutmut_9",
        "objcrop.crops.policies.xǁViewPairPolicyǁ_clean__mutmut_10",
        "objcrop.ssl.heads.x_views_and_kinds__mutmut_17",
    ]
    assert mutate.survivors_by_function(keys) == "`iou` 2, `ViewPairPolicy._clean` 1, `views_and_kinds` 1"


def test_a_module_without_a_record_is_shown_as_not_run():
    table = mutate.render_table({})
    rows = table.splitlines()[2:]
    assert len(rows) == len(mutate.MODULES) and all("| not run |" in row for row in rows)
