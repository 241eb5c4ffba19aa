r"""The README's result tables, rendered from the result files in ``benchmarks/results/`` (never typed by hand).

Every table in the README sits in a block ``<!-- results: NAME -->`` ... ``<!-- /results -->`` whose content is
the rendering of ``benchmarks/results/NAME.json``: a line saying where the numbers come from (date, commit,
machine, library versions, a note when they were not re-run at HEAD) and the table, drawn by the renderer of
the file's ``kind``. Result files are written by the commands that measure them (``objcrop analyze coverage
--out``, ``benchmarks/bench_*.py --json``, ``benchmarks/bench_quality.py``), with ``commit``, ``machine``,
``date`` and ``command``. ``tests/test_readme_results.py`` checks that every block is its file's rendering.

    python benchmarks/results_tables.py --write      # rewrite the README's blocks from the result files
    python benchmarks/results_tables.py --check      # exit 1 and name the blocks that differ
    python benchmarks/results_tables.py coverage-coco128   # print one block's rendering
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from objcrop.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
REQUIRED = ("kind", "commit", "machine", "date", "command")
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

Renderer = Callable[[dict], str]
RENDERERS: dict[str, Renderer] = {}


def renders(kind: str) -> Callable[[Renderer], Renderer]:
    """Registers the table renderer of result files of ``kind``."""

    def register(function: Renderer) -> Renderer:
        RENDERERS[kind] = function
        return function

    return register


def load_result(name: str, folder: Path = RESULTS) -> dict:
    """The result file ``NAME.json``, checked for its provenance fields and a known kind."""
    path = folder / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no result file {path} for the README block {name!r}")
    result = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in REQUIRED if not result.get(key)]
    if missing:
        raise ValueError(f"{path}: missing provenance field(s) {missing}")
    if result["kind"] not in RENDERERS:
        raise ValueError(f"{path}: unknown kind {result['kind']!r} (known: {', '.join(sorted(RENDERERS))})")
    return result


def provenance_line(name: str, result: dict) -> str:
    """Where the numbers come from, in one italic paragraph (with the note first when there is one)."""
    torch = result.get("versions", {}).get("torch")
    where = f"{result['machine']}" + (f", torch {torch}" if torch else "")
    line = (
        f"_`benchmarks/results/{name}.json`: measured {result['date']} at commit {result['commit']} on {where}; "
        f"command: `{result['command']}`._"
    )
    if result.get("note"):
        line = f"**{result['note']}** " + line
    return line


def render(name: str, folder: Path = RESULTS) -> str:
    """The content of the README block ``name``: the provenance line and the table of its result file."""
    result = load_result(name, folder)
    try:
        table = RENDERERS[result["kind"]](copy.deepcopy(result)).rstrip()
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{folder / name}.json: not a {result['kind']} result ({error!r})") from None
    return f"{provenance_line(name, result)}\n\n{table}\n"


def blocks(text: str) -> dict[str, str]:
    """``{name: content}`` of every results block in ``text`` (a name may appear once)."""
    found: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        if match["name"] in found:
            raise ValueError(f"README block {match['name']!r} appears twice")
        found[match["name"]] = match["body"]
    return found


def rewrite(text: str, folder: Path = RESULTS) -> str:
    """``text`` with every results block replaced by its rendering."""
    blocks(text)  # refuses duplicates
    return BLOCK.sub(lambda m: m[1] + "\n" + render(m["name"], folder) + "\n" + m[4], text)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value, digits: int = 1) -> str:
    """A number with ``digits`` decimals; a string (a range typed as measured, e.g. '27-29') stays as it is."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _interval(mean: float | None, ci: list | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


@renders("coverage")
def coverage_table(result: dict) -> str:
    """``objcrop analyze coverage --out``: GT share of the views' intersection per policy."""
    rows = []
    for r in result["results"]:
        ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"][0] is not None else "-"
        mean = "-" if r["mean_gt_fraction"] is None else f"{r['mean_gt_fraction']:.3f}"
        rows.append([r["policy"], mean, ci, str(r["pairs"]), str(r["skipped_empty"]), str(r["fallbacks"])])
    first = result["results"][0]
    table = _table(["policy", "GT fraction", "95 % CI", "pairs", "empty intersections", "fallbacks"], rows)
    settings = result["settings"]
    grown = f", proposals grown to {settings['min_box_size']:g} px" if settings.get("min_box_size") else ""
    return (
        f"{table}\n\n{first['images']} images with GT boxes ({first['images_without_gt']} without, skipped), "
        f"{first['pairs_per_image']} pairs per image, seed {first['seed']}, proposals {settings['proposals']}{grown}."
    )


@renders("coverage-by-proposals")
def coverage_by_proposals_table(result: dict) -> str:
    """GT share of the views' intersection per proposal source (rows) and policy (columns)."""
    policies = result["policies"]
    rows = [[r["proposals"]] + [_interval(*r["coverage"][p]) for p in policies] for r in result["rows"]]
    return _table(["proposals", *policies], rows)


@functools.cache
def _bench_quality():
    """``benchmarks/bench_quality.py`` as a module (it imports torch: loaded only for quality results)."""
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@renders("quality")
def quality_table(result: dict) -> str:
    """``benchmarks/bench_quality.py``: its own tables (mAP per arm, paired differences)."""
    return _bench_quality().report(result)


@renders("demo")
def demo_table(result: dict) -> str:
    """``objcrop demo``'s summary: linear-probe test mAP per backbone, one seed."""
    rows = [[arm, f"{value:.1f}"] for arm, value in result["linear_map"].items()]
    rows.append(["chance", f"{result['chance_map']:.1f}"])
    return f"{_table(['backbone', 'test mAP (%)'], rows)}\n\nOne seed per arm, {result['seconds'] / 60:.1f} min in all."


@renders("crops")
def crops_table(result: dict) -> str:
    """``benchmarks/bench_crops.py --json``: two-view samples per second and the ratio to the baseline."""
    rows = [[r["pipeline"], f"{r['img_per_s']:.1f}", f"{r['ratio']:.3f}"] for r in result["rows"]]
    table = _table(["pipeline", "images/s", f"ratio to {result['baseline']}"], rows)
    if result.get("blur_ms"):  # files from before the blur comparison was kept have none
        base = result["blur_ms"][0]["ms"]
        blur = [[b["what"], f"{b['ms']:.2f}", f"{b['ms'] / base:.1f}"] for b in result["blur_ms"]]
        size = result.get("settings", {}).get("size", "")
        table += "\n\n" + _table(
            [f"Gaussian blur of one {size} px view", "ms", f"x {result['blur_ms'][0]['what']}"], blur
        )
    return table


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 1000 else f"{value:.1f}" if value >= 100 else f"{value:.2f}"


@renders("proposals")
def proposals_table(result: dict) -> str:
    """``benchmarks/bench_proposals.py --json``: time per image, ratio to OpenCV's BING, recall at IoU 0.5."""
    ks = result["ks"]
    rows = []
    for r in result["rows"]:
        rate = 1000 / r["ms"]
        cells = [r["method"], _ms(r["ms"]), f"{rate:.1f}" if rate < 1 else f"{rate:.0f}", _num(r["x_opencv"])]
        if r["method"] == result.get("default"):
            cells = [f"**{cell}**" for cell in cells]
        rows.append(cells + [f"{r['recall'][str(k)]:.3f}" for k in ks])
    return _table(["method", "ms/img", "img/s", "x OpenCV", *(f"R@{k}" for k in ks)], rows)


@renders("train-cpu")
def train_cpu_table(result: dict) -> str:
    """``benchmarks/bench_train.py --json``: objcrop's training step against the MoCo-v2 pseudocode step."""
    header = [
        "condition",
        "objcrop step (img/s)",
        "fp32 reference step from the MoCo-v2 pseudocode (img/s)",
        "ratio",
        f"DataLoader, {result['workers']} workers (img/s)",
    ]
    rows = [
        [r["condition"], _num(r["objcrop"]), _num(r["reference"]), _num(r["ratio"], 2), _num(r["loader"])]
        for r in result["rows"]
    ]
    return _table(header, rows)


@renders("train-gpu")
def train_gpu_table(result: dict) -> str:
    """``benchmarks/gpu_throughput.py --json``: MoCo-v2 step rates on the GPU, ratio to the fp32 reference."""
    reference = result["rows"][0]["img_per_s"]
    rows = [
        [
            r["path"],
            f"{r['img_per_s']:.0f}",
            f"{1000 * result['batch'] / r['img_per_s']:.1f}",
            _num(r["peak_gib"]),
            f"{r['img_per_s'] / reference:.2f}x",
        ]
        for r in result["rows"]
    ]
    settings = f"{result['arch']} at {result['size']} px, batch {result['batch']}, on {result['device']}"
    return f"{_table(['path', 'img/s', 'ms/step', 'peak GiB', 'ratio'], rows)}\n\n{settings}."


@renders("detect")
def detect_table(result: dict) -> str:
    """``benchmarks/bench_detect.py``: box AP x 100 of Faster R-CNN fine-tuned from each start, one seed."""
    shown = ("AP", "AP50", "AP75")
    rows = [
        [start] + [_num(None if r.get(k) is None else 100 * r[k]) for k in shown]
        for start, r in result["results"].items()
    ]
    order = sorted(result["results"], key=lambda s: result["results"][s]["AP50"], reverse=True)
    return f"{_table(['start', *shown], rows)}\n\nOrder by AP50 in this run: {' > '.join(order)}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="print these blocks' renderings")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the README's blocks from the result files")
    action.add_argument("--check", action="store_true", help="exit 1 when a README block is not its rendering")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    try:
        if args.write:
            new = rewrite(text)
            if new != text:
                write_text_atomic(README, new)
            print(f"{len(blocks(new))} blocks rendered into {README}")
        elif args.check:
            stale = [name for name, body in blocks(text).items() if body != "\n" + render(name) + "\n"]
            print("stale README blocks: " + ", ".join(stale) if stale else "every README block is up to date")
            return 1 if stale else 0
        for name in args.names:
            print(render(name))
    except (OSError, ValueError) as error:
        print(f"results_tables: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
