"""README: "`make demo` ... runs `objcrop demo`"; "`make test` ... the test suite and ruff (this is what CI runs:
.ci/run)". The Makefile's recipes and the CI script, read as make and bash would run them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(target: str) -> tuple[list[str], list[str]]:
    """The prerequisites and the recipe lines of ``target`` in the Makefile."""
    lines = (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        match = re.match(rf"^{re.escape(target)}:(.*)$", line)
        if match:
            recipe = []
            for body in lines[i + 1 :]:
                if not body.startswith("\t"):
                    break
                recipe.append(body[1:])
            return match.group(1).split(), recipe
    raise AssertionError(f"no target {target!r} in the Makefile")


def test_make_test_sets_up_then_runs_the_suite_on_one_thread_and_ruff():
    prerequisites, recipe = _recipe("test")
    assert prerequisites == ["$(STAMP)"]
    assert recipe[0] == "OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q"
    assert recipe[1:] == [
        "$(BIN)/ruff check objcrop tests benchmarks tools",
        "$(BIN)/ruff format --check objcrop tests benchmarks tools",
    ]


def test_the_set_up_installs_the_pinned_torch_before_objcrop():
    _, recipe = _recipe("$(STAMP)")
    torch = recipe.index("$(BIN)/pip install torch==2.14.1 torchvision==0.29.1")
    assert recipe[0] == "$(PYTHON) -m venv $(VENV)" and recipe.index("$(BIN)/pip install -e '.[dev]'") > torch
    assert recipe[-1] == "touch $(STAMP)"  # only after every step succeeded


def test_make_demo_runs_objcrop_demo():
    prerequisites, recipe = _recipe("demo")
    assert prerequisites == ["$(STAMP)"] and recipe == ["$(BIN)/objcrop demo --out demo_report"]


def test_ci_runs_make_test_and_nothing_else():
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "make test"]
