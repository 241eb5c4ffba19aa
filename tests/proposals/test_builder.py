import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from objcrop.cli import main
from objcrop.data.records import Records
from objcrop.proposals import ProposalStore
from objcrop.proposals.builder import (
    BuildAbortedError,
    build_store,
    finalize_proposals,
    merge_store,
    parse_shard,
    propose_image,
    shard_from_env,
)
from objcrop.proposals.random_boxes import RandomBoxProposer
from tests.conftest import make_records

SIZES = [(64, 48), (40, 56), (72, 40), (48, 48), (56, 32), (32, 64), (60, 44)]


def write_images(folder: Path, sizes=SIZES, ext: str = ".jpg") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(sizes):
        pixels = np.random.default_rng(i).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        name = f"im{i:02d}{ext}"
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def records_for(root: Path, names, sizes) -> Records:
    """One box in the top-left quarter of each image."""
    return make_records([[[1, 1, w / 2, h / 2]] for w, h in sizes], size=sizes, paths=names, root=str(root))


@pytest.fixture
def dataset(tmp_path) -> Records:
    names = write_images(tmp_path / "images")
    return records_for(tmp_path / "images", names, SIZES)


def assert_same_store(a: ProposalStore, b: ProposalStore) -> None:
    assert len(a) == len(b) and a.keys == b.keys
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.sizes, b.sizes)


def test_build_writes_a_complete_store(dataset, tmp_path):
    result = build_store(dataset, RandomBoxProposer(n=30), tmp_path / "s", topk=10, shard_size=3, progress=False)
    assert result.images == len(dataset) and result.failed == [] and result.merged and result.img_per_s > 0
    store = ProposalStore.open(tmp_path / "s", dataset)
    assert store.counts().tolist() == [10] * len(dataset)
    assert not (tmp_path / "s" / "shards").exists()  # merged chunks are removed
    for i in range(len(dataset)):
        w, h = dataset.size(i)
        expect, _ = RandomBoxProposer(n=30)(np.asarray(Image.open(dataset.path(i)).convert("RGB")))
        np.testing.assert_allclose(store.boxes_of(i), expect[:10])
        b = store.boxes_of(i)
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert store.meta["build"]["topk"] == 10 and store.meta["counts"]["failed"] == 0

    again = build_store(dataset, RandomBoxProposer(n=30), tmp_path / "s", topk=10, shard_size=3, progress=False)
    assert again.images == 0 and again.skipped == len(dataset) and again.merged
    with pytest.raises(ValueError, match="different proposal store.*topk 10 vs 5"):
        build_store(dataset, RandomBoxProposer(n=30), tmp_path / "s", topk=5, shard_size=3, progress=False)


def test_two_workers_equal_one(dataset, tmp_path):
    proposer = RandomBoxProposer(n=25, seed=4)
    build_store(dataset, proposer, tmp_path / "one", workers=1, shard_size=2, progress=False)
    result = build_store(dataset, proposer, tmp_path / "two", workers=2, shard_size=2, progress=False)
    assert result.images == len(dataset)
    assert_same_store(ProposalStore.open(tmp_path / "one"), ProposalStore.open(tmp_path / "two"))


def test_shards_on_two_machines_merge_to_the_single_build(dataset, tmp_path):
    proposer = RandomBoxProposer(n=12)
    build_store(dataset, proposer, tmp_path / "single", topk=8, shard_size=2, progress=False)
    parts = []
    for i in range(2):
        r = build_store(dataset, proposer, tmp_path / f"m{i}", topk=8, shard=(i, 2), shard_size=2, progress=False)
        assert not r.merged and not (tmp_path / f"m{i}" / "meta.json").exists()
        parts.append(sorted(p.name for p in (tmp_path / f"m{i}" / "shards").glob("*.npz")))
    assert parts[0] == ["000000000-000000002.npz", "000000004-000000006.npz"]
    assert parts[1] == ["000000002-000000004.npz", "000000006-000000007.npz"]

    with pytest.raises(ValueError, match=r"2 of 4 chunks missing: 000000002-000000004.npz \(chunk 1, images 2-3\)"):
        merge_store(tmp_path / "m0", dataset)
    for name in parts[1]:
        shutil.copy(tmp_path / "m1" / "shards" / name, tmp_path / "m0" / "shards" / name)
    merged = merge_store(tmp_path / "m0", dataset)
    assert_same_store(merged, ProposalStore.open(tmp_path / "single", dataset))
    with pytest.raises(FileNotFoundError, match="holds no proposal chunks"):
        merge_store(tmp_path / "m1" / "nothing", dataset)


def test_bad_images_are_counted_and_get_no_proposals(tmp_path):
    names = write_images(tmp_path / "images", SIZES[:4])
    (tmp_path / "images" / names[1]).write_bytes(b"this is not a jpeg")
    (tmp_path / "images" / names[2]).unlink()
    records = records_for(tmp_path / "images", names, SIZES[:4])
    result = build_store(records, RandomBoxProposer(n=5), tmp_path / "s", workers=2, shard_size=2, progress=False)
    assert [key for key, _ in result.failed] == [names[1], names[2]]
    assert "not found" in result.failed[1][1]
    store = ProposalStore.open(tmp_path / "s", records)
    assert store.counts().tolist() == [5, 0, 0, 5]
    assert [k for k, _ in store.meta["failed"]] == [names[1], names[2]] and store.meta["counts"]["failed"] == 2


def test_a_wrong_setup_stops_early(tmp_path):
    records = records_for(tmp_path / "missing", [f"{i}.jpg" for i in range(40)], [(8, 8)] * 40)
    with pytest.raises(BuildAbortedError, match="first 32 images all failed"):
        build_store(records, RandomBoxProposer(n=1), tmp_path / "s", progress=False)


def test_proposer_errors_are_failures_not_crashes(dataset):
    def broken(image):
        return np.zeros((3, 4), np.float32), np.zeros(2, np.float32)

    boxes, scores, reason = propose_image(broken, dataset.path(0), *dataset.size(0))
    assert reason == "proposer failed: ValueError: proposer returned 3 boxes but 2 scores"
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_finalize_scales_clips_and_keeps_order():
    boxes = np.array([[5, 5, 10, 10], [-4, 0, 30, 8], [2, 2, 2, 9], [np.inf, 0, 1, 1], [1, 1, 3, 3]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    out, s = finalize_proposals(boxes, scores, 40, 20, topk=2, scale=(2.0, 2.0))
    np.testing.assert_array_equal(out, [[10, 10, 20, 20], [0, 0, 40, 16]])
    np.testing.assert_array_equal(s, scores[:2])
    out, s = finalize_proposals(boxes, scores, 40, 20, topk=None)
    np.testing.assert_array_equal(s, scores[[0, 1, 4]])


class BrightBox:
    """Proposes the bounding box of the bright pixels; remembers the image sizes it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, image):
        self.seen.append(image.shape[:2])
        ys, xs = np.nonzero(image.mean(axis=2) > 128)
        box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
        return box, np.ones(1, np.float32)


@pytest.mark.parametrize("ext,height", [(".jpg", 240), (".png", 240), (".jpg", 243)])
def test_decode_max_side_gives_boxes_in_original_pixels(tmp_path, ext, height):
    pixels = np.zeros((height, 400, 3), np.uint8)
    pixels[60:180, 100:300] = 255
    Image.fromarray(pixels).save(tmp_path / f"a{ext}")
    records = records_for(tmp_path, [f"a{ext}"], [(400, height)])
    proposer = BrightBox()
    build_store(records, proposer, tmp_path / "s", decode_max_side=100, progress=False)
    assert proposer.seen == [(height // 4, 100)]
    box = ProposalStore.open(tmp_path / "s", records).boxes_of(0)
    np.testing.assert_allclose(box, [[100, 60, 300, 180]], atol=8)
    assert ProposalStore.open(tmp_path / "s").meta["build"]["decode_max_side"] == 100


def test_size_mismatch_is_a_failure(tmp_path):
    names = write_images(tmp_path, [(30, 20)])
    records = records_for(tmp_path, names, [(20, 30)])
    _, _, reason = propose_image(RandomBoxProposer(n=1), records.path(0), 20, 30)
    assert reason == "decoded size 30x20 differs from the dataset's 20x30"
    _, _, reason = propose_image(RandomBoxProposer(n=1), records.path(0), 20, 30, decode_max_side=10)
    assert "does not match" in reason


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


# ------------------------------------------------------------------ kill -9 and resume

SCRIPT = """
import json, os, signal, sys, time
import numpy as np
import objcrop.proposals.builder as builder
from objcrop.data.records import Record, Records
from objcrop.proposals.random_boxes import RandomBoxProposer

# argv: spec, out, calls log, then optionally what to do at a fixed point: "image:N" kill -9 this
# process as the N-th image is proposed, "write:N" halfway through writing the N-th chunk;
# "wait:PATH" hold the first image until PATH exists.
kind, arg = sys.argv[4].split(":", 1) if len(sys.argv) > 4 else ("", "0")

def kill_9():
    os.kill(os.getpid(), signal.SIGKILL)

class Counting:
    def __init__(self, log):
        self.log, self.inner, self.calls = log, RandomBoxProposer(n=9), 0

    def __call__(self, image):
        with open(self.log, "a") as f:
            f.write("x")
        self.calls += 1
        if kind == "image" and self.calls == int(arg):
            kill_9()
        deadline = time.monotonic() + 120  # a bound, so that a failed test cannot leave this running
        while kind == "wait" and self.calls == 1 and not os.path.exists(arg) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.inner(image)

chunks_written = 0

def write_bytes_then_maybe_die(path, data):
    global chunks_written
    chunks_written += 1
    if kind == "write" and chunks_written == int(arg):
        from objcrop.io import atomic_open
        with atomic_open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            kill_9()
    return write_bytes_atomic(path, data)

write_bytes_atomic = builder.write_bytes_atomic
builder.write_bytes_atomic = write_bytes_then_maybe_die

spec = json.load(open(sys.argv[1]))
recs = [Record(k, w, h) for k, (w, h) in zip(spec["keys"], spec["sizes"])]
records = Records.from_records(recs, [], root=spec["root"])
builder.build_store(records, Counting(sys.argv[3]), sys.argv[2], shard_size=2, progress=False)
"""


def _build_script(dataset, tmp_path) -> list[str]:
    """The command line of SCRIPT on ``dataset`` without its last arguments (out, calls, fixed point)."""
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(SCRIPT))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"keys": dataset.keys(), "sizes": SIZES, "root": dataset.root}))
    return [sys.executable, str(script), str(spec)]


@pytest.mark.parametrize("kill", ["image:6", "write:3"])
def test_kill_9_resumes_without_recomputing_finished_chunks(dataset, tmp_path, kill):
    """The build kills itself (SIGKILL) at a fixed point: while proposing image 6 (chunk 3 of 4 half
    done) or halfway through writing chunk 3. Exactly chunks 1 and 2 survive, and only the rest is
    recomputed on resume."""
    command = _build_script(dataset, tmp_path)
    out, calls = tmp_path / "s", tmp_path / "calls"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    killed = subprocess.run([*command, str(out), str(calls), kill], env=env)
    assert killed.returncode == -signal.SIGKILL
    finished = sorted(p.name for p in (out / "shards").glob("*.npz"))
    assert finished == ["000000000-000000002.npz", "000000002-000000004.npz"]
    assert not (out / "meta.json").exists()
    first_calls = len(calls.read_text())
    assert first_calls == 6
    half_written = list((out / "shards").glob(".000000004-000000006.npz.*.tmp"))
    assert len(half_written) == (kill == "write:3")

    subprocess.run([*command, str(out), str(calls)], env=env, check=True)
    second_calls = len(calls.read_text()) - first_calls
    assert second_calls == len(dataset) - 4  # the two finished chunks were not recomputed
    resumed = ProposalStore.open(out, dataset)

    build_store(dataset, RandomBoxProposer(n=9), tmp_path / "clean", shard_size=2, progress=False)
    assert_same_store(resumed, ProposalStore.open(tmp_path / "clean", dataset))
    assert not (out / "shards").exists(), "the merge left files in shards/"


# ------------------------------------------------------------------ the command


def write_coco(tmp_path: Path) -> tuple[Path, Path]:
    names = write_images(tmp_path / "images", SIZES[:3])
    coco = {
        "images": [
            {"id": i + 1, "file_name": name, "width": w, "height": h}
            for i, (name, (w, h)) in enumerate(zip(names, SIZES[:3], strict=True))
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 30, 20], "area": 600, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return tmp_path / "a.json", tmp_path / "images"


def test_propose_command_json_and_gt(tmp_path, capsys):
    ann, images = write_coco(tmp_path)
    data = ["--format", "coco", "--annotations", str(ann), "--images", str(images)]
    argv = ["propose", "--backend", "random", "--opt", "n=6", *data, "--out", str(tmp_path / "s"), "--topk", "4"]
    assert main([*argv, "--workers", "1", "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert out.count("\n") == 1 and set(summary) == {"images", "seconds", "img_per_s", "failed"}
    assert summary["images"] == 3 and summary["failed"] == 0
    store = ProposalStore.open(tmp_path / "s")
    assert store.meta["backend"] == "random" and store.meta["params"] == {"n": 6} and len(store.boxes) == 12

    assert main(["propose", "--backend", "gt", *data, "--out", str(tmp_path / "g"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    gt = ProposalStore.open(tmp_path / "g")
    np.testing.assert_array_equal(gt.boxes_of(0), [[5, 5, 35, 25], [1, 1, 11, 11]])

    assert main(["propose", "--backend", "random", "--opt", "size=3", *data, "--out", str(tmp_path / "x")]) == 2
    assert "it takes: n, scale, ratio, seed" in capsys.readouterr().err


def test_propose_command_shards_and_merge(tmp_path, capsys):
    ann, images = write_coco(tmp_path)
    data = ["--format", "coco", "--annotations", str(ann), "--images", str(images), "--out", str(tmp_path / "s")]
    base = ["propose", "--backend", "random", *data, "--shard-size", "1", "--no-progress"]
    assert main([*base, "--shard", "0/2"]) == 0
    assert main(["propose", "--merge", *data]) == 2
    assert "1 of 3 chunks missing: 000000001-000000002.npz" in capsys.readouterr().err
    assert main([*base, "--shard", "1/2"]) == 0
    assert main(["propose", "--merge", *data]) == 0
    assert "merged" in capsys.readouterr().out
    assert len(ProposalStore.open(tmp_path / "s")) == 3


class Crashing:
    """Kills its worker process on the third image, like a segfault in a backend would."""

    def __call__(self, image):
        if image.shape[:2] == (SIZES[2][1], SIZES[2][0]):
            os._exit(1)
        return RandomBoxProposer(n=2)(image)


def test_a_crashed_worker_stops_the_build_instead_of_hanging(dataset, tmp_path):
    with pytest.raises(BuildAbortedError, match="worker process died"):
        build_store(dataset, Crashing(), tmp_path / "s", workers=2, shard_size=2, progress=False)
    assert not (tmp_path / "s" / "meta.json").exists()


# ------------------------------------------------------------------ what objcrop may delete or replace


def test_propose_refuses_a_shards_folder_it_did_not_make(tmp_path, capsys):
    ann, images = write_coco(tmp_path)
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "my-notes.txt").write_text("mine")
    data = ["--format", "coco", "--annotations", str(ann), "--images", str(images), "--out", str(out)]
    assert main(["propose", "--backend", "random", *data, "--no-progress"]) == 2
    assert f"{out / 'shards'} was not written by objcrop" in capsys.readouterr().err
    assert (out / "shards" / "my-notes.txt").read_text() == "mine" and not (out / "meta.json").exists()


def test_merge_deletes_only_the_chunks_it_wrote(dataset, tmp_path, caplog):
    proposer = RandomBoxProposer(n=4)
    build_store(dataset, proposer, tmp_path / "s", shard=(0, 2), shard_size=2, progress=False)
    (tmp_path / "s" / "shards" / "notes.txt").write_text("mine")  # dropped in by the user meanwhile
    build_store(dataset, proposer, tmp_path / "s", shard=(1, 2), shard_size=2, progress=False)
    merge_store(tmp_path / "s", dataset)
    assert sorted(os.listdir(tmp_path / "s" / "shards")) == ["notes.txt"]
    assert "kept 1 files objcrop did not write (notes.txt)" in caplog.text
    assert len(ProposalStore.open(tmp_path / "s", dataset)) == len(dataset)


def test_every_backend_refuses_a_different_store_and_overwrite_replaces_it(tmp_path, capsys):
    ann, images = write_coco(tmp_path)
    data = ["--format", "coco", "--annotations", str(ann), "--images", str(images), "--out", str(tmp_path / "s")]
    random_run = ["propose", "--backend", "random", "--opt", "n=3", *data, "--no-progress"]
    assert main(random_run) == 0
    assert main(["propose", "--backend", "gt", *data]) == 2
    assert "already holds a different proposal store (backend 'random' vs 'gt'" in capsys.readouterr().err
    assert ProposalStore.open(tmp_path / "s").meta["backend"] == "random"

    assert main(["propose", "--backend", "gt", *data, "--overwrite"]) == 0
    gt = ProposalStore.open(tmp_path / "s")
    assert gt.meta["backend"] == "gt" and len(gt.boxes) == 2
    assert main(["propose", "--backend", "gt", *data]) == 0  # the same store again: nothing to do
    assert "already complete" in capsys.readouterr().out

    assert main(random_run) == 2
    assert "already holds a different proposal store" in capsys.readouterr().err
    assert main([*random_run, "--overwrite"]) == 0
    assert ProposalStore.open(tmp_path / "s").meta["backend"] == "random"


def test_overwrite_never_replaces_files_objcrop_did_not_write(tmp_path, capsys):
    ann, images = write_coco(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "boxes.npy").write_bytes(b"someone else's array")
    data = ["--format", "coco", "--annotations", str(ann), "--images", str(images), "--out", str(tmp_path / "s")]
    for backend in ("gt", "random"):
        assert main(["propose", "--backend", backend, *data, "--overwrite", "--no-progress"]) == 2
        assert "boxes.npy was not written by objcrop" in capsys.readouterr().err
    assert (tmp_path / "s" / "boxes.npy").read_bytes() == b"someone else's array"


def test_overwrite_removes_the_chunks_of_a_different_build(dataset, tmp_path):
    build_store(dataset, RandomBoxProposer(n=4), tmp_path / "s", shard=(0, 2), shard_size=2, progress=False)
    with pytest.raises(ValueError, match="holds chunks of a different build .*--overwrite"):
        build_store(dataset, RandomBoxProposer(n=4), tmp_path / "s", topk=2, shard_size=3, progress=False)
    build_store(dataset, RandomBoxProposer(n=4), tmp_path / "s", topk=2, shard_size=3, progress=False, overwrite=True)
    assert ProposalStore.open(tmp_path / "s", dataset).counts().tolist() == [2] * len(dataset)
    assert not (tmp_path / "s" / "shards").exists()


# ------------------------------------------------------------------ two runs into one folder


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(dataset, tmp_path):
    """The first run holds its first image until the second run has been refused: no race."""
    command = _build_script(dataset, tmp_path)
    out, calls, release = tmp_path / "s", tmp_path / "calls", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, str(out), str(calls), f"wait:{release}"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not calls.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and calls.exists(), "the first run did not reach its first image"
        second = Counting()
        with pytest.raises(ValueError, match=rf"another objcrop propose \(pid {proc.pid}\) is writing {out}"):
            build_store(dataset, second, out, shard_size=2, progress=False)
        assert second.calls == 0
    finally:
        release.touch()
        proc.wait(timeout=120)
    assert proc.returncode == 0 and len(calls.read_text()) == len(dataset)  # the first run did all, once
    build_store(dataset, Counting(), out, shard_size=2, progress=False)  # free again once it ended


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return RandomBoxProposer(n=9)(image)


# ------------------------------------------------------------------ damaged chunks


RANDOM = {"backend": "random", "params": {"n": 4}}


def _half_built(dataset, tmp_path):
    build_store(
        dataset, RandomBoxProposer(n=4), tmp_path / "s", shard=(0, 2), shard_size=2, meta=RANDOM, progress=False
    )
    chunks = sorted((tmp_path / "s" / "shards").glob("*.npz"))
    assert len(chunks) == 2
    return chunks


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(b"", "EOFError"), (b"PK\x03\x04 cut off", "BadZipFile"), (b"\x00" * 64, "ValueError")],
)
def test_a_damaged_chunk_is_named_on_resume_before_any_work(dataset, tmp_path, damage, reason):
    chunks = _half_built(dataset, tmp_path)
    chunks[1].write_bytes(damage)
    proposer = Counting()
    with pytest.raises(ValueError, match=rf"corrupt chunk {chunks[1]}: {reason}.*delete it and re-run") as info:
        build_store(dataset, proposer, tmp_path / "s", shard=(0, 2), shard_size=2, meta=RANDOM, progress=False)
    assert proposer.calls == 0 and "Traceback" not in str(info.value)
    chunks[1].unlink()  # as the message says: the chunk is recomputed
    build_store(dataset, proposer, tmp_path / "s", shard=(0, 2), shard_size=2, meta=RANDOM, progress=False)
    assert proposer.calls == 2


def test_a_damaged_chunk_is_named_by_merge(tmp_path, capsys):
    ann, images = write_coco(tmp_path)
    data = ["--format", "coco", "--annotations", str(ann), "--images", str(images), "--out", str(tmp_path / "s")]
    for i in range(2):
        assert main(["propose", "--backend", "random", *data, "--shard-size", "1", "--shard", f"{i}/2"]) == 0
    chunk = tmp_path / "s" / "shards" / "000000001-000000002.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])  # a copy cut short
    assert main(["propose", "--merge", *data]) == 2
    err = capsys.readouterr().err
    assert f"corrupt chunk {chunk}" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "meta.json").exists()


def test_a_chunk_with_impossible_boxes_is_named_by_merge(dataset, tmp_path):
    chunks = _half_built(dataset, tmp_path)
    build_store(
        dataset, RandomBoxProposer(n=4), tmp_path / "s", shard=(1, 2), shard_size=2, meta=RANDOM, progress=False
    )
    with np.load(chunks[0]) as z:
        arrays = dict(z)
    arrays["boxes"][3] = [5, 5, 1, 1]
    np.savez(chunks[0], **arrays)
    with pytest.raises(ValueError, match=rf"corrupt chunk {chunks[0]}: boxes row 3 \(image 0\).*x2 < x1"):
        merge_store(tmp_path / "s", dataset)


# ------------------------------------------------------------------ shards from the cluster launcher


@pytest.mark.parametrize(
    ("env", "shard"),
    [
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, (2, 3)),
        ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "3", "WORLD_SIZE": "4"}, (0, 2)),
    ],
)
def test_shard_from_env(env, shard):
    assert shard_from_env(env)[0] == shard
    assert shard_from_env({}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_ID='x' is not an integer"),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3"}, r"shard 4/3 is invalid.*pass --shard"),
    ],
)
def test_shard_from_env_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        shard_from_env(env)


def test_three_slurm_array_tasks_and_a_merge_equal_one_process(tmp_path, monkeypatch, caplog):
    names = write_images(tmp_path / "images")
    data = ["--format", "folder", "--images", str(tmp_path / "images")]
    common = ["--backend", "random", "--opt", "n=5", "--opt", "seed=3", *data, "--shard-size", "2", "--no-progress"]
    for var in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(var, raising=False)
    assert main(["propose", *common, "--out", str(tmp_path / "single")]) == 0

    for task in (1, 2, 3):  # sbatch --array=1-3
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        with caplog.at_level(logging.INFO, logger="objcrop"):
            assert main(["propose", *common, "--out", str(tmp_path / "array")]) == 0
        assert f"shard {task - 1}/3 (from SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN" in caplog.text
        assert not (tmp_path / "array" / "meta.json").exists()
    assert len(list((tmp_path / "array" / "shards").glob("*.npz"))) == 4
    assert main(["propose", "--merge", *data, "--out", str(tmp_path / "array")]) == 0

    single, merged = ProposalStore.open(tmp_path / "single"), ProposalStore.open(tmp_path / "array")
    assert len(single) == len(names) and list(merged.keys) == list(single.keys)
    assert_same_store(merged, single)
    np.testing.assert_array_equal(merged.image_ids, single.image_ids)

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # an explicit --shard wins over the launcher
    assert main(["propose", *common, "--out", str(tmp_path / "explicit"), "--shard", "0/2"]) == 0
    assert sorted(p.name for p in (tmp_path / "explicit" / "shards").glob("*.npz"))[0] == "000000000-000000002.npz"
