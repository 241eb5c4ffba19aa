"""The registries (objcrop/registry.py): lazy tables, every target imports, and the README lists every name."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from objcrop import registry
from objcrop.proposals.backends import backend_names
from objcrop.registry import DatasetFormat, Registry, UnknownNameError, import_target

README = Path(__file__).resolve().parents[1] / "README.md"

TABLES = {
    "METHODS": registry.METHODS,
    "POLICIES": registry.POLICIES,
    "BACKENDS": registry.BACKENDS,
    "FORMATS": registry.FORMATS,
    "AUGMENTS": registry.AUGMENTS,
}


def test_every_registry_of_the_module_is_checked_here():
    found = {name for name, value in vars(registry).items() if isinstance(value, Registry)}
    assert found == set(TABLES)


def test_a_target_is_imported_when_it_is_read_not_when_it_is_registered(tmp_path, monkeypatch):
    (tmp_path / "objcrop_lazy_probe.py").write_text("VALUE = {'answer': 42}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = Registry("probe", {"x": "objcrop_lazy_probe:VALUE", "pair": ("a", "b")})
    assert "objcrop_lazy_probe" not in sys.modules and table.names() == ("x", "pair") and "x" in table
    try:
        assert table["x"] == {"answer": 42} and table.target("x") == "objcrop_lazy_probe:VALUE"
        assert "objcrop_lazy_probe" in sys.modules
    finally:
        sys.modules.pop("objcrop_lazy_probe", None)
    assert table["pair"] == ("a", "b")  # anything but a string is the entry itself
    assert import_target("json:JSONDecoder.decode") is __import__("json").JSONDecoder.decode


def test_unknown_names_and_bad_targets_are_clear_errors():
    table = Registry("widget", {"one": "json:dumps", "two": "json:loads"})
    with pytest.raises(UnknownNameError, match="^unknown widget 'three'; choose from one, two$") as err:
        table["three"]
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)  # mapping code, exit code 2
    assert table.get("three") is None and "three" not in table
    for bad in ("json.dumps", "json:dumps:x", "json:", ":dumps", "1json:dumps"):
        with pytest.raises(ValueError, match=r"widget 'x': expected 'module:attribute'"):
            table.register("x", bad)
    with pytest.raises(ValueError, match="non-empty string"):
        table.register("", "json:dumps")
    with pytest.raises(ValueError, match="reader: expected 'module:function'"):
        DatasetFormat("objcrop.data.coco.read_coco")


def test_registering_replacing_and_removing_keep_the_order(monkeypatch):
    table = Registry("widget", {"one": "json:dumps"})
    table.register("two", "json:loads")
    table["one"] = "json:load"
    assert list(table) == ["one", "two"] and len(table) == 2
    monkeypatch.setitem(table, "three", len)  # what a plug-in (or a test) does
    assert table["three"] is len and table.names()[-1] == "three"
    monkeypatch.undo()
    assert table.names() == ("one", "two")
    del table["one"]
    assert table.names() == ("two",)


def test_every_method_target_is_an_ssl_method():
    from objcrop.ssl.base import SSLMethod

    for name in registry.METHODS:
        cls = registry.METHODS[name]
        assert inspect.isclass(cls) and issubclass(cls, SSLMethod) and not inspect.isabstract(cls), name


def test_every_backend_target_is_a_factory_taking_keyword_options():
    for name in registry.BACKENDS:
        factory = registry.BACKENDS[name]
        assert callable(factory), name
        kinds = {p.kind for p in inspect.signature(factory).parameters.values()}
        assert inspect.Parameter.POSITIONAL_ONLY not in kinds, name


def test_every_format_reader_takes_what_its_entry_promises():
    for name in registry.FORMATS:
        spec = registry.FORMATS[name]
        params = inspect.signature(import_target(spec.reader)).parameters
        positional = 2 if spec.annotations is not None else 1  # (annotations, images) or (images)
        assert len(params) >= positional, name
        assert set(spec.options.values()) <= set(params), name
        assert set(spec.options) <= {"labels_csv", "classes_csv"}, name


def test_every_augmentation_preset_builds_one_transform_or_a_pair():
    import torch

    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    for name in registry.AUGMENTS:
        made = registry.AUGMENTS[name](8)
        pair = made if isinstance(made, tuple) else (made, made)
        assert len(pair) == 2, name
        for transform in pair:
            assert transform(image).shape == (3, 8, 8), name


def test_reading_the_names_and_building_the_parser_imports_no_backend_reader_or_torch():
    code = (
        "import sys\n"
        "from objcrop import registry\n"
        "names = [r.names() for r in (registry.METHODS, registry.POLICIES, registry.BACKENDS, registry.FORMATS,"
        " registry.AUGMENTS)]\n"
        "from objcrop.cli import build_parser\n"
        "build_parser()\n"
        "heavy = ['torch', 'numba', 'cv2', 'objcrop.proposals.bing', 'objcrop.proposals.opencv_backends',"
        " 'objcrop.crops.augment', 'objcrop.data.webdataset', 'objcrop.ssl.moco']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the README lists every registered name

# (line marker, names it must list). The "Extending objcrop" table has one row per registry, named by its table.
README_LISTS = [
    ("- view-pair policies:", registry.POLICIES.names()),
    ("# 2. proposals (formats:", registry.FORMATS.names()),
    ("-> objcrop.proposals  backends (", tuple(backend_names())),
    *((f"| `{table}` |", TABLES[table].names()) for table in TABLES),
]


def listed(name: str, line: str) -> bool:
    """Whether ``name`` appears in ``line`` as a whole name (``obj-obj`` is not in ``obj-obj-dilate``)."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", line) is not None


@pytest.mark.parametrize(("marker", "names"), README_LISTS, ids=[m for m, _ in README_LISTS])
def test_the_readme_lists_every_registered_name(marker, names):
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if marker in line]
    assert len(lines) == 1, f"README.md needs exactly one line with {marker!r}, found {len(lines)}"
    missing = [name for name in names if not listed(name, lines[0])]
    assert missing == [], f"README.md's line {marker!r} lacks {missing}"


def test_listed_matches_whole_names_only():
    assert listed("obj-obj", "`obj-obj-dilate`, `obj-obj`") and not listed("obj-obj", "`obj-obj-dilate`")
    assert not listed("bing", "opencv-bing") and listed("bing", "(bing, opencv-bing)")
