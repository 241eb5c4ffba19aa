"""Mutation testing of objcrop's core modules, one module at a time, each against its own test files.

``make mutate`` runs this script. For each module it builds a scratch project under ``.mutmut/<name>/``
(symlinks to the checkout's files and a ``pyproject.toml`` whose ``[tool.mutmut]`` is the checkout's with
``only_mutate`` and the test selection narrowed to that module), runs ``mutmut run`` there, and writes
``.mutmut/<name>/summary.json`` plus one line per module on stdout. mutmut's working copy is
``.mutmut/<name>/mutants/`` (git-ignored); the checkout's code and tests are never touched. With ``--record``
(``make mutate`` passes it) the summary, with each survivor's diff, also goes to ``docs/mutation/<name>.json``
(committed), and docs/testing.md's rate table is rendered again from those files (``--table`` does only that);
tests/test_mutation_records.py fails when the table is not their rendering.

Equivalent mutants (a mutation no test can tell apart from the original) are listed in :data:`EQUIVALENT`
with the reason; they are reported apart and left out of the killed rate. Docstrings are never mutated
(mutmut skips triple-quoted strings); log calls are skipped by ``do_not_mutate_patterns`` in pyproject.toml.

Usage::

    python tools/mutate.py                  # every module, the ssl ones last
    python tools/mutate.py --no-ssl         # the non-ssl modules
    python tools/mutate.py boxes coverage   # named modules
    python tools/mutate.py --keep boxes     # reuse .mutmut/boxes (mutmut re-tests only what changed)
    python tools/mutate.py --record moco    # and keep the result in docs/mutation/moco.json
    python tools/mutate.py --table          # docs/testing.md's table from docs/mutation/*.json
    python tools/mutate.py --rescore --record boxes  # the last run again, after EQUIVALENT changed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from datetime import datetime, timezone
from pathlib import Path

from objcrop.io import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutmut"
RECORDS = ROOT / "docs" / "mutation"
TESTING_MD = ROOT / "docs" / "testing.md"
TABLE_START, TABLE_END = "<!-- mutation-table: rendered by tools/mutate.py --table -->", "<!-- /mutation-table -->"

# name -> (the module mutated, the test files that run against it)
MODULES: dict[str, tuple[str, list[str]]] = {
    "boxes": ("objcrop/boxes.py", ["tests/test_boxes.py"]),
    "policies": ("objcrop/crops/policies.py", ["tests/crops/test_policies.py"]),
    "coverage": ("objcrop/analysis/coverage.py", ["tests/analysis/test_coverage.py"]),
    "metrics": ("objcrop/evaluate/metrics.py", ["tests/evaluate/test_metrics.py"]),
    "detection_metrics": ("objcrop/evaluate/detection_metrics.py", ["tests/evaluate/test_detection_metrics.py"]),
    "losses": ("objcrop/ssl/losses.py", ["tests/ssl/test_losses.py"]),
    "moco": ("objcrop/ssl/moco.py", ["tests/ssl/test_moco.py"]),
    "byol": ("objcrop/ssl/byol.py", ["tests/ssl/test_byol.py"]),
    "densecl": ("objcrop/ssl/densecl.py", ["tests/ssl/test_densecl.py"]),
    # heads.py: its own tests, and the method tests that build every head it has.
    "heads": (
        "objcrop/ssl/heads.py",
        [
            "tests/ssl/test_heads.py",
            "tests/ssl/test_moco.py",
            "tests/ssl/test_byol.py",
            "tests/ssl/test_densecl.py",
            "tests/ssl/test_base.py",
        ],
    ),
}
SSL = ("losses", "moco", "byol", "densecl", "heads")

# Mutant name -> why no test can kill it. Left out of the killed rate, reported by name.
_ULP = "float64 instead of float32 for an intermediate: the float32 result differs by rounding (<= 1 ulp) at most"
_DROPPED = "the value written into non-finite rows, which `finite` drops from the result anyway"
_DIVIDE = "union == 0 implies inter == 0 (inter <= each area), so the only division by zero is 0/0, an 'invalid'"
_NO_STDOUT = "redirect_stdout(None) sets sys.stdout to None, and print() then writes nothing: just as quiet"
_RESHAPE = "numpy's reshape takes any negative size as the one to infer, -2 as -1"
_IDS = "COCOeval only needs distinct positive annotation ids (it tests id > 0): k + 2 numbers them as well as k + 1"
_STRICT = "the zipped sequences have one length by construction: strict=True only guards that"
_INT64 = "numpy 2's default integer is int64 on every platform, so the explicit dtype changes nothing"
_DIM1 = "F.normalize's default dim is 1, the one given"
_CPU = "untestable here: the tests' only device is the CPU, the default; on a GPU this mutant would fail"
_TORCH_INT64 = "a tensor made from Python ints (torch.full, torch.tensor) is int64 without the dtype"
_INPLACE = "ReLU(inplace=...) only decides whether the input's memory is reused: the values are the same"
_SAME_SIZE = "views_and_kinds checks on the next line that every view has this batch size"
_UNTRACKED = "KeyQueue.enqueue ignores heads when it does not track them (heads is None without mask_by_head)"
EQUIVALENT: dict[str, str] = {
    "objcrop.boxes.x_iou__mutmut_35": _DIVIDE,
    "objcrop.boxes.x_iou__mutmut_37": _DIVIDE,
    "objcrop.boxes.x_dilate__mutmut_9": _ULP,
    "objcrop.boxes.x_dilate__mutmut_11": _ULP,
    "objcrop.boxes.x_shift__mutmut_25": _ULP,
    "objcrop.boxes.x_sanitize__mutmut_17": _DROPPED,
    "objcrop.boxes.x_sanitize__mutmut_21": _DROPPED,
    "objcrop.evaluate.detection_metrics.x__quiet_coco__mutmut_1": _NO_STDOUT,
    "objcrop.evaluate.detection_metrics.x_coco_evaluate__mutmut_70": _NO_STDOUT,
    "objcrop.evaluate.detection_metrics.x__xywh__mutmut_11": _RESHAPE,
    "objcrop.evaluate.detection_metrics.xǁDetectionsǁconcatenate__mutmut_19": _RESHAPE,
    "objcrop.evaluate.detection_metrics.x_coco_evaluate__mutmut_15": _IDS,
    **{f"objcrop.evaluate.detection_metrics.x_coco_evaluate__mutmut_{n}": _STRICT for n in (38, 43, 44, 74, 77, 79)},
    **{f"objcrop.evaluate.detection_metrics.x_ground_truth_from_records__mutmut_{n}": _STRICT for n in (45, 49, 50)},
    "objcrop.evaluate.detection_metrics.x_ground_truth_from_json__mutmut_45": _INT64,
    "objcrop.evaluate.detection_metrics.x_ground_truth_from_json__mutmut_47": _INT64,
    "objcrop.evaluate.detection_metrics.x_ground_truth_from_records__mutmut_98": _INT64,
    "objcrop.evaluate.detection_metrics.x_ground_truth_from_records__mutmut_101": _INT64,
    "objcrop.ssl.moco.xǁKeyQueueǁ__init____mutmut_14": _DIM1,
    "objcrop.ssl.moco.xǁKeyQueueǁ__init____mutmut_41": _TORCH_INT64,
    "objcrop.ssl.moco.xǁKeyQueueǁ__init____mutmut_44": _TORCH_INT64,
    "objcrop.ssl.moco.xǁMoCoV2ǁforward__mutmut_24": _DIM1,
    **{f"objcrop.ssl.moco.xǁMoCoV2ǁ_in_batch_loss__mutmut_{n}": _STRICT for n in (11, 15, 16)},
    **{f"objcrop.ssl.moco.xǁMoCoV2ǁforward__mutmut_{n}": _STRICT for n in (50, 53, 54)},
    "objcrop.ssl.moco.xǁMoCoV2ǁ_in_batch_loss__mutmut_23": _CPU,
    "objcrop.ssl.moco.xǁMoCoV2ǁ_in_batch_loss__mutmut_25": _CPU,
    "objcrop.ssl.moco.xǁMoCoV2ǁforward__mutmut_93": _UNTRACKED,
    "objcrop.ssl.byol.xǁBYOLǁforward__mutmut_15": "views_and_kinds has checked that both views hold one batch size",
    **{
        f"objcrop.crops.policies.x_random_resized_crop_box__mutmut_{n}": (
            "with a zero target both w and h are 0, and the other side's unmutated test still rejects the attempt"
        )
        for n in (46, 49)
    },
    "objcrop.crops.policies.x_random_resized_crop_box__mutmut_50": (
        "h == rh needs a draw that hits the region's height exactly; where it does (a crop of the whole region, "
        "scale 1), the fallback gives the same box"
    ),
    **{
        f"objcrop.crops.policies.x_random_resized_crop_box__mutmut_{n}": (
            "at in_ratio == the ratio bound, that branch's box is (rw, rh): the same as the else branch"
        )
        for n in (80, 85)
    },
    **{
        f"objcrop.crops.policies.xǁViewPairPolicyǁ_usable__mutmut_{n}": (
            "cleaning all proposals again gives the same first topk when the head already had topk usable ones"
        )
        for n in (10, 11, 12)
    },
    **{
        f"objcrop.crops.policies.xǁViewPairPolicyǁusable_proposals__mutmut_{n}": (
            "expand_to_min_size to 0 px is the identity, and of no box is no box"
        )
        for n in (8, 9)
    },
    "objcrop.crops.policies.xǁViewPairPolicyǁcalibrate__mutmut_12": "linspace(0, -1, 0) is empty, as [] is",
    "objcrop.crops.policies.xǁViewPairPolicyǁcalibrate__mutmut_14": "the picks are rounded and read through int(i)",
    "objcrop.crops.policies.xǁViewPairPolicyǁcalibrate__mutmut_57": "float('NAN') is float('nan')",
    "objcrop.crops.policies.xǁViewPairPolicyǁsample__mutmut_4": "box is read only by object regions, which set it",
    "objcrop.crops.policies.xǁViewPairPolicyǁsample__mutmut_66": "rng.random() == 0.5 exactly has probability 0",
    "objcrop.crops.policies.xǁViewPairPolicyǁ__init____mutmut_61": (
        "two kinds are always a strict subset of the four VIEW_KINDS"
    ),
    "objcrop.crops.policies.xǁViewPairPolicyǁ_object_scale__mutmut_25": (
        "regions under 1.000001 px² give lo = min(cap, 0.2 W H / area) = cap either way for any image of 5 px² or more"
    ),
    **{
        f"objcrop.crops.policies.xǁViewPairPolicyǁ_region__mutmut_{n}": (
            "a scene region is the whole image, which growing to min_box_size (clamped to the image) leaves as it is"
        )
        for n in (12, 14, 15)
    },
    "objcrop.crops.policies.xǁViewPairPolicyǁ_region__mutmut_16": "expand_to_min_size to 0 px is the identity",
    **{f"objcrop.crops.policies.xǁViewPairPolicyǁ_region__mutmut_{n}": _ULP for n in (28, 30)},
    **{
        f"objcrop.evaluate.metrics.{key}": "float('NAN') is float('nan')"
        for key in (
            "x_chance_level__mutmut_7",
            "x_chance_level__mutmut_25",
            "x_mean_average_precision__mutmut_21",
            "x_top1_accuracy__mutmut_10",
        )
    },
    "objcrop.evaluate.metrics.x_chance_level__mutmut_33": _RESHAPE,
    "objcrop.evaluate.metrics.x_top1_accuracy__mutmut_5": _RESHAPE,
    "objcrop.evaluate.metrics.x_mean_average_precision__mutmut_30": (
        "sklearn's default average='macro' is the mean of the per-class APs, which this function then takes"
    ),
    **{
        f"objcrop.evaluate.metrics.x_mean_average_precision__mutmut_{n}": (
            "float32 to float64 is exact, so the ranking and its ties are the same; sklearn computes in float64"
        )
        for n in (5, 7)
    },
    "objcrop.ssl.losses.x__flatten_map__mutmut_2": "flatten(2) of a 3-D [B, C, N] tensor is the tensor",
    "objcrop.ssl.losses.x_byol_loss__mutmut_10": "F.cosine_similarity's default dim is 1, the one given",
    "objcrop.ssl.losses.x_info_nce_from_logits__mutmut_4": _CPU,
    "objcrop.ssl.losses.x_info_nce_from_logits__mutmut_7": _CPU,
    **{
        f"objcrop.analysis.coverage.x__bootstrap_ci__mutmut_{n}": (
            "a resample without pairs has num 0 as well: its 0 / 0 is 'invalid', never 'divide'"
        )
        for n in (47, 49)
    },
    **{f"objcrop.analysis.coverage.x_coverage__mutmut_{n}": _INT64 for n in (105, 108, 119, 121)},
    **{
        f"objcrop.analysis.coverage.x_coverage__mutmut_{n}": "the sums are float64 already (frac.sum() of float64)"
        for n in (115, 117)
    },
    **{
        f"objcrop.analysis.coverage.x_coverage__mutmut_{n}": "the policy's float32 crops are exact in float64"
        for n in (62, 64)
    },
    "objcrop.analysis.coverage.x_coverage__mutmut_137": "astype(None) is float64, the dtype given",
    **{
        f"objcrop.analysis.coverage.x_coverage__mutmut_{n}": (
            "covered(box) exceeds the box's area, or falls below 0, only by rounding: the clip guards the last bit"
        )
        for n in (91, 92, 99)
    },
    **{f"objcrop.analysis.coverage.x_coverage_table__mutmut_{n}": _STRICT for n in (44, 47, 50)},
    **{f"objcrop.analysis.coverage.xǁUnionAreaǁ__init____mutmut_{n}": _STRICT for n in (73, 78, 79)},
    **{f"objcrop.analysis.coverage.x_intersections__mutmut_{n}": _ULP for n in (9, 11)},
    "objcrop.analysis.coverage.x_intersections__mutmut_13": _RESHAPE,
    "objcrop.analysis.coverage.xǁUnionAreaǁ__init____mutmut_19": _ULP,
    "objcrop.analysis.coverage.xǁUnionAreaǁcovered__mutmut_2": _ULP,
    "objcrop.analysis.coverage.xǁUnionAreaǁcovered__mutmut_27": (
        "the inclusion-exclusion sum is negative only by rounding: the clip guards the last bit"
    ),
    **{
        f"objcrop.analysis.coverage.xǁUnionAreaǁ__init____mutmut_{n}": (
            "x is clipped to the grid before the lookup, and no box lies left of (above) the first grid line, "
            "since every box edge is one: starting the grid at 1 instead of 0 changes no cumulative area"
        )
        for n in (27, 34)
    },
    **{
        f"objcrop.analysis.coverage.xǁUnionAreaǁ__init____mutmut_{n}": (
            "a float 0/1 grid gives the same cumulative sums as a boolean one"
        )
        for n in (40, 42)
    },
    **{
        f"objcrop.analysis.coverage.xǁUnionAreaǁ_cumulative__mutmut_{n}": (
            "x is clipped to [xs[0], xs[-1]] first, so searchsorted(side='right') - 1 is never below 0"
        )
        for n in (24, 44)
    },
    **{
        f"objcrop.analysis.coverage.xǁUnionAreaǁ_cumulative__mutmut_{n}": (
            "the cumulative area is continuous: on a grid line both neighbouring cells interpolate to one value"
        )
        for n in (35, 55)
    },
    "objcrop.ssl.heads.x_views_and_kinds__mutmut_17": _SAME_SIZE,
    **{f"objcrop.ssl.heads.x_views_and_kinds__mutmut_{n}": _TORCH_INT64 for n in (28, 32)},
    **{f"objcrop.ssl.heads.x_views_and_kinds__mutmut_{n}": _CPU for n in (29, 33, 36, 40, 42, 44)},
    **{f"objcrop.ssl.heads.xǁ{c}ǁ__init____mutmut_{n}": _INPLACE for c in ("ConvMLPHead", "MLPHead") for n in (15, 16)},
    **{f"objcrop.ssl.heads.xǁKindRoutedHeadǁ__init____mutmut_{n}": _TORCH_INT64 for n in (45, 47)},
    "objcrop.ssl.heads.xǁKindRoutedHeadǁ__init____mutmut_50": "register_buffer tests `not persistent`: None is False",
    "objcrop.ssl.heads.xǁKindRoutedHeadǁ_select__mutmut_6": "head 0 again: torch.where(head_of == 0, y0, y0) is y0",
    "objcrop.ssl.heads.xǁKindRoutedHeadǁ_split__mutmut_33": (
        "reached only for an empty batch (with two or more heads), where every head gives the same empty tensor"
    ),
    **{f"objcrop.ssl.densecl.xǁDenseCLǁ_dense_keys__mutmut_{n}": _DIM1 for n in (7, 15)},
    **{f"objcrop.ssl.densecl.xǁDenseCLǁforward__mutmut_{n}": _DIM1 for n in (44, 49, 73, 78, 89)},
    **{f"objcrop.ssl.densecl.xǁDenseCLǁforward__mutmut_{n}": _STRICT for n in (29, 32, 33)},
    **{f"objcrop.ssl.densecl.xǁDenseEncoderǁforward__mutmut_{n}": _STRICT for n in (28, 32, 35)},
}

# mutmut's exit codes (mutmut.stats.status_by_exit_code), grouped the way docs/testing.md reports them.
KILLED = {"killed"}
SURVIVED = {"survived"}
TIMEOUT = {"timeout", "suspicious", "segfault"}
NO_TESTS = {"no tests", "skipped", "not checked", "check was interrupted by user", "caught by type check"}

# Top-level entries of the checkout the scratch project links to (tests read some of them next to themselves).
LINKED = ("objcrop", "tests", "benchmarks", "configs", "docs", "README.md")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _toml(tables: dict[str, dict]) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        out.append("")
    return "\n".join(out)


def prepare(name: str, keep: bool) -> Path:
    """The scratch project of one module, ``.mutmut/<name>/``, fresh unless ``keep``."""
    module, tests = MODULES[name]
    work = WORK / name
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for entry in LINKED:
        link = work / entry
        if (ROOT / entry).exists() and not link.exists():
            link.symlink_to(ROOT / entry)
    # tests find ../shared/data next to the project root: the scratch project's root is mutants/'s parent.
    shared = ROOT.parent / "shared"
    if shared.exists() and not (work / "shared").exists():
        (work / "shared").symlink_to(shared)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mutmut = dict(project["tool"]["mutmut"])
    mutmut["only_mutate"] = [module]
    mutmut["pytest_add_cli_args_test_selection"] = list(tests)
    pytest_ini = project["tool"]["pytest"]["ini_options"]
    (work / "pyproject.toml").write_text(_toml({"tool.mutmut": mutmut, "tool.pytest.ini_options": pytest_ini}))
    return work


def _mutmut(work: Path, *args: str, log=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONHASHSEED="0")
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run(
        [str(exe), *args], cwd=work, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def results(work: Path) -> dict[str, str]:
    """Mutant name -> status, from mutmut's metadata in ``work/mutants``."""
    statuses = {}
    for meta in (work / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for key, code in data.get("exit_code_by_key", {}).items():
            statuses[key] = _status(code)
    return statuses


def _status(code) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def summarize(name: str, statuses: dict[str, str], seconds: float) -> dict:
    """Counts and killed rate of one module; equivalent mutants are counted apart."""
    equivalent = sorted(k for k in statuses if k in EQUIVALENT)
    counted = {k: s for k, s in statuses.items() if k not in EQUIVALENT}
    killed = sum(s in KILLED for s in counted.values())
    survived = sorted(k for k, s in counted.items() if s in SURVIVED)
    timeout = sorted(k for k, s in counted.items() if s in TIMEOUT)
    no_tests = sorted(k for k, s in counted.items() if s in NO_TESTS)
    # A timeout is a mutant the tests stopped (an endless loop), so it counts as detected, as mutmut's own score does.
    detected = killed + len(timeout)
    return {
        "module": MODULES[name][0],
        "tests": MODULES[name][1],
        "mutants": len(statuses),
        "equivalent": equivalent,
        "counted": len(counted),
        "killed": killed,
        "timeout_or_suspicious": timeout,
        "survived": survived,
        "no_tests": no_tests,
        "rate": round(100.0 * detected / len(counted), 1) if counted else None,
        "seconds": round(seconds),
    }


def _commit() -> str:
    """HEAD's short hash, with `` (with uncommitted changes)`` where objcrop/ or tests/ differ from it.

    Unlike objcrop's ``git_commit`` (result files), only the code and tests count, untracked files included:
    they are what mutmut copies, while a run with ``--record`` itself changes docs/ between modules."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "objcrop", "tests"], capture_output=True, text=True)
    return head + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def run_module(name: str, keep: bool, jobs: int) -> dict:
    """Run mutmut on one module; its log is ``.mutmut/<name>/run.log``."""
    work = prepare(name, keep)
    commit = _commit()  # mutmut copies the code and tests now: this is the state it measures
    start = time.monotonic()
    with open(work / "run.log", "w") as log:
        proc = _mutmut(work, "run", "--max-children", str(jobs), log=log)
    summary = summarize(name, results(work), time.monotonic() - start)
    summary["exit_code"] = proc.returncode
    summary["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary["commit"] = commit
    from importlib.metadata import version

    summary["mutmut"] = version("mutmut")
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def survivor_diff(work: Path, key: str) -> str:
    """The changed lines of one mutant (``mutmut show``), ``-`` original and ``+`` mutant."""
    shown = _mutmut(work, "show", key).stdout
    lines = [ln for ln in shown.splitlines() if ln[:1] in "-+" and not ln.startswith(("---", "+++"))]
    return "\n".join(ln[0] + " " + ln[1:].strip() for ln in lines)


def record(name: str, summary: dict, work: Path) -> Path:
    """Writes ``docs/mutation/<name>.json`` (atomically): the summary and each survivor's diff."""
    kept = {**summary, "survivor_diffs": {key: survivor_diff(work, key) for key in summary["survived"]}}
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{name}.json"
    write_json_atomic(path, kept, indent=2, ensure_ascii=False)
    return path


def load_records() -> dict[str, dict]:
    """Module name -> its record, for the modules of :data:`MODULES` that have one."""
    return {
        n: json.loads((RECORDS / f"{n}.json").read_text("utf-8")) for n in MODULES if (RECORDS / f"{n}.json").exists()
    }


def _function(key: str) -> str:
    """``Class.method`` or ``function`` of a mutant name (``pkg.mod.xǁCǁm__mutmut_3``, ``pkg.mod.x_f__mutmut_3``)."""
    name = key.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
    return ".".join(name.split("ǁ")[1:]) if "ǁ" in name else name[2:]


def survivors_by_function(keys: list[str]) -> str:
    """``f 3, C.m 2``: where the survivors are, most first."""
    counts = Counter(_function(key) for key in keys)
    return ", ".join(f"`{f}` {n}" for f, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def render_table(records: dict[str, dict]) -> str:
    """docs/testing.md's table of killed-mutant rates, one row per module of :data:`MODULES`."""
    rows = [
        "| module | tests | measured at | mutants | equivalent | killed | timeout | survived | rate | survivors in |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (module, tests) in MODULES.items():
        shown = ", ".join(f"`{t}`" for t in tests)
        r = records.get(name)
        if r is None:
            rows.append(f"| `{module}` | {shown} | not run | | | | | | | |")
            continue
        rows.append(
            f"| `{module}` | {shown} | {r['commit']}, {r['date']}, {r['seconds']} s | {r['mutants']} | "
            f"{len(r['equivalent'])} | {r['killed']} | {len(r['timeout_or_suspicious'])} | {len(r['survived'])} | "
            f"{r['rate']:.1f} % | {survivors_by_function(r['survived'])} |"
        )
    return "\n".join(rows)


def with_table(text: str) -> str:
    """``text`` (docs/testing.md) with the table between its markers rendered again from the records."""
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[:start] + "\n" + render_table(load_records()) + "\n" + text[end:]


def write_table() -> None:
    """Renders docs/testing.md's table again, in place."""
    write_text_atomic(TESTING_MD, with_table(TESTING_MD.read_text(encoding="utf-8")))


def rescore(name: str) -> dict:
    """The summary of the last run in ``.mutmut/<name>`` again, with today's :data:`EQUIVALENT` (no mutmut run)."""
    work = WORK / name
    last = json.loads((work / "summary.json").read_text())
    summary = summarize(name, results(work), last["seconds"])
    summary.update({k: last[k] for k in ("exit_code", "date", "commit", "mutmut")})
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the named modules (default: all of them) and print one summary line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"modules to run, of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--no-ssl", action="store_true", help="leave out the ssl modules")
    parser.add_argument("--keep", action="store_true", help="reuse .mutmut/<name> instead of starting fresh")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--record", action="store_true", help="keep each result in docs/mutation/<name>.json")
    parser.add_argument("--table", action="store_true", help="only render docs/testing.md's table again")
    parser.add_argument(
        "--rescore", action="store_true", help="no mutmut run: the last run's results with today's EQUIVALENT"
    )
    args = parser.parse_args(argv)
    if args.table:
        write_table()
        return 0
    unknown = [n for n in args.modules if n not in MODULES]
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    names = args.modules or [n for n in MODULES if not (args.no_ssl and n in SSL)]
    failed = False
    for name in names:
        s = rescore(name) if args.rescore else run_module(name, args.keep, args.jobs)
        print(
            f"{name:9s} {s['module']:32s} mutants {s['mutants']:4d}  equivalent {len(s['equivalent']):3d}  "
            f"killed {s['killed']:4d}  survived {len(s['survived']):3d}  timeout/suspicious "
            f"{len(s['timeout_or_suspicious']):3d}  no tests {len(s['no_tests']):3d}  rate {s['rate']}%  "
            f"({s['seconds']} s, mutmut exit {s['exit_code']})",
            flush=True,
        )
        for key in s["survived"]:
            print(f"    survived: {key}")
        if args.record:
            print(f"    recorded in {record(name, s, WORK / name).relative_to(ROOT)}", flush=True)
            write_table()
        failed |= s["exit_code"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
