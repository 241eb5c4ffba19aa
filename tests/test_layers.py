"""Layers only look down: data < proposals < crops < ssl < evaluate < analysis, with the commands, the CLI
and the demo on top and the leaf helpers (objcrop.io, boxes, registry, parallel) below everything.

Every ``import`` statement counts, also the ones inside functions and under ``TYPE_CHECKING``: a lazy
import is still a dependency. Imports by string (``importlib.import_module``) are not seen.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "objcrop"

# The rank of each top-level part of objcrop; a module may import only parts of a rank <= its own.
LAYERS = {
    "io": 0,
    "boxes": 0,
    "registry": 0,  # the extension points' tables: imports nothing from objcrop (targets are strings)
    "parallel": 0,  # the process pool helper
    "data": 1,
    "proposals": 2,
    "crops": 3,
    "ssl": 4,
    "evaluate": 5,
    "analysis": 6,
    "commands": 7,
    "cli": 7,
    "demo": 7,
    "__main__": 7,
    "__init__": 0,  # objcrop/__init__.py: the version, imports nothing
}

# (importing module, imported module) pairs allowed to point up, each with its reason. None today.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def objcrop_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute import of an ``objcrop`` module in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "objcrop":
            found += [(node.lineno, f"objcrop.{alias.name}") for alias in node.names]  # from objcrop import io
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return sorted((line, name) for line, name in found if name == "objcrop" or name.startswith("objcrop."))


def module_name(path: Path) -> str:
    return ".".join(("objcrop", *path.relative_to(PACKAGE).with_suffix("").parts))


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, imported in objcrop_imports(path.read_text(encoding="utf-8")):
            if LAYERS[layer(imported)] > LAYERS[layer(importer)] and (importer, imported) not in ALLOWED_UPWARD:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer(importer)}) imports {imported}")
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert parts - {"__pycache__"} <= set(LAYERS), "give the new part of objcrop a rank in LAYERS"


def test_lower_layers_never_import_higher_ones():
    assert upward_imports() == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "ssl").glob("*.py")), ids=lambda p: p.name)
def test_ssl_imports_neither_evaluate_nor_analysis(path):
    imports = objcrop_imports(path.read_text(encoding="utf-8"))
    bad = [(line, name) for line, name in imports if layer(name) in ("evaluate", "analysis")]
    assert bad == [], f"{path.name}: the trainer gets monitors from its caller instead"


def test_the_import_walk_sees_lazy_and_from_imports():
    source = (
        "import objcrop.evaluate.knn\n"
        "from objcrop.analysis import plots\n"
        "def f():\n"
        "    from objcrop.evaluate.knn import KNNMonitor\n"
        "from . import sibling\n"
        "from objcrop import boxes, evaluate\n"
        "import numpy\n"
    )
    assert objcrop_imports(source) == [
        (1, "objcrop.evaluate.knn"),
        (2, "objcrop.analysis"),
        (4, "objcrop.evaluate.knn"),
        (6, "objcrop.boxes"),
        (6, "objcrop.evaluate"),
    ]
    assert layer("objcrop.ssl.trainer") == "ssl" and layer("objcrop") == "__init__"
