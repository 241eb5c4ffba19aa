"""Real-data tests skip, naming what is missing, where ../shared/data is absent (a fresh clone, CI).

Two checks: every test that reaches ``SHARED_DATA`` (directly, through a module constant or helper derived from
it, a fixture, or a parametrization table) carries the ``shared_data`` mark; and run with
``OBJCROP_TEST_SHARED_DATA`` pointing at a missing folder, the marked tests fail nowhere and every skip names
that folder.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def _data_names(module: ast.Module) -> dict[str, ast.AST]:
    """Module-level names whose value or body reaches SHARED_DATA, to a fixed point: name -> its definition."""
    defs: dict[str, ast.AST] = {}
    for node in module.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defs.update({t.id: node for t in targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            defs[node.name] = node
    data = {"SHARED_DATA"}
    while True:
        grown = {name for name, node in defs.items() if name not in data and _names(node) & data}
        if not grown:
            return {name: defs[name] for name in data if name in defs}
        data |= grown


def _marked(node: ast.AST, aliases: set[str]) -> bool:
    """Whether ``node`` has the mark: ``@needs_shared_data(...)``, ``@pytest.mark.shared_data``, or a module alias
    of either (``needs_coco = needs_shared_data("coco128")``)."""
    return any("shared_data" in ast.unparse(d) or _names(d) & aliases for d in getattr(node, "decorator_list", []))


def _unmarked_tests(path: Path, root: Path = TESTS) -> list[str]:
    """``file::test`` (relative to ``root``) of each test that reaches shared data without the mark."""
    module = ast.parse(path.read_text(encoding="utf-8"))
    if any(
        isinstance(n, ast.Assign) and "pytestmark" in _names(n) and "shared_data" in ast.unparse(n) for n in module.body
    ):
        return []
    data = set(_data_names(module))
    aliases = {
        t.id
        for n in module.body
        if isinstance(n, ast.Assign) and "shared_data" in ast.unparse(n.value)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    found = []
    tests = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    for cls in (n for n in module.body if isinstance(n, ast.ClassDef) and not _marked(n, aliases)):
        tests += [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    for test in tests:
        reached = _names(test) | {a.arg for a in test.args.args}
        if reached & data and not _marked(test, aliases):
            found.append(f"{path.relative_to(root)}::{test.name} (reaches {sorted(reached & data)})")
    return found


def test_no_test_file_finds_the_shared_data_by_itself():
    """One place (conftest.SHARED_DATA) says where the data is, so one variable can move it for every test."""
    own = [
        str(p.relative_to(TESTS))
        for p in TESTS.rglob("*.py")
        if p.name not in ("conftest.py", Path(__file__).name) and '"shared"' in p.read_text(encoding="utf-8")
    ]
    assert own == []


def test_every_test_that_reaches_the_shared_data_is_marked():
    unmarked = [t for p in sorted(TESTS.rglob("test_*.py")) for t in _unmarked_tests(p)]
    assert unmarked == []


def test_the_check_finds_a_test_through_a_constant_a_helper_and_a_fixture(tmp_path):
    """The check itself bites: each route to the data, unmarked, is reported; marked, it is not."""
    source = """
import pytest
from tests.conftest import SHARED_DATA, needs_shared_data
IMAGES = SHARED_DATA / "coco128"
def _first():
    return sorted(IMAGES.glob("*"))[0]
@pytest.fixture
def image():
    return _first()
def test_constant():
    assert IMAGES
def test_helper():
    assert _first()
def test_fixture(image):
    assert image
@needs_shared_data("coco128")
def test_marked():
    assert IMAGES
def test_elsewhere(tmp_path):
    assert tmp_path
"""
    path = tmp_path / "test_probe.py"
    path.write_text(source, encoding="utf-8")
    found = [t.split("::")[1].split()[0] for t in _unmarked_tests(path, tmp_path)]
    assert found == ["test_constant", "test_helper", "test_fixture"]


@pytest.mark.slow  # a second pytest over the marked tests: about 15 s
def test_without_the_data_every_marked_test_skips_and_names_what_is_missing(tmp_path):
    missing = tmp_path / "no-shared-data"
    report = tmp_path / "report.xml"
    env = dict(os.environ, OBJCROP_TEST_SHARED_DATA=str(missing), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "shared_data", "-p", "no:cacheprovider"]
    # Only the files that can hold a marked test, so that the second pytest imports little.
    files = [str(p) for p in sorted(TESTS.rglob("test_*.py")) if "shared_data" in p.read_text(encoding="utf-8")]
    files.remove(str(Path(__file__)))
    proc = subprocess.run([*command, f"--junitxml={report}", *files], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    skips = {f"{c.get('classname')}::{c.get('name')}": c.find("skipped") for c in cases}
    skipped = {name: s.get("message", "") for name, s in skips.items() if s is not None}
    # Every real-data file has tests among these; a test may pass when only part of it needs the data.
    assert len(skipped) >= 20, sorted(skips)
    assert {name: msg for name, msg in skipped.items() if str(missing) not in msg} == {}
