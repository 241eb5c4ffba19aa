"""webdataset tar shards: reading (keys, sizes, boxes, skips, errors), member paths, writing, and
``objcrop propose --format webdataset`` end to end."""

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from objcrop.cli import main
from objcrop.data.coco import read_coco
from objcrop.data.images import image_size, load_image
from objcrop.data.readers import FORMATS, load_records
from objcrop.data.synth import synthesize
from objcrop.data.webdataset import (
    ShardRecords,
    expand_shards,
    parse_annotations,
    read_member,
    read_webdataset,
    write_shards,
)
from objcrop.proposals import ProposalStore


def jpeg(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A shard with exactly these members, in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def ann_json(boxes=(), width=None, height=None, **extra) -> bytes:
    obj = {"annotations": [{"bbox": list(b), "category_id": c} for b, c in boxes], **extra}
    if width is not None:
        obj.update(width=width, height=height)
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    synthesize(out, num_images=16, seed=0, size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(scenes, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("shards")
    return out, write_shards(read_coco(scenes / "annotations.json", scenes / "images"), out, samples_per_shard=8)


def test_written_shards_read_back_as_the_coco_records(scenes, shards):
    folder, paths = shards
    coco = read_coco(scenes / "annotations.json", scenes / "images")
    assert [Path(p).name for p in paths] == ["shard-000000.tar", "shard-000001.tar"]
    records = read_webdataset(folder)
    assert isinstance(records, ShardRecords) and len(records) == 16
    assert records.keys() == [k.removesuffix(".jpg") for k in coco.keys()]
    assert records.class_names == coco.class_names
    np.testing.assert_array_equal(records.widths, coco.widths)
    np.testing.assert_array_equal(records.box_offsets, coco.box_offsets)
    np.testing.assert_allclose(records.boxes, coco.boxes, atol=1e-4)
    np.testing.assert_array_equal(records.box_labels, coco.box_labels)
    np.testing.assert_array_equal(records.labels, coco.labels)
    assert records.path(9) == f"{paths[1]}#000009.jpg"
    # The brace pattern and the folder name the same shards; a subset keeps the member paths.
    pattern = read_webdataset(folder / "shard-{000000..000001}.tar")
    assert pattern.keys() == records.keys() and pattern.path(9) == records.path(9)
    assert records.subset([9, 2]).path(0) == records.path(9)


def test_member_paths_decode_like_the_image_files(scenes, shards):
    records = read_webdataset(shards[0])
    for i in (0, 9, 15):
        original = scenes / "images" / f"{records.key(i)}.jpg"
        assert image_size(records.path(i)) == image_size(original) == records.size(i)
        np.testing.assert_array_equal(np.asarray(load_image(records.path(i))), np.asarray(load_image(original)))
    assert read_member(records.shard(3), "000003.jpg") == (scenes / "images" / "000003.jpg").read_bytes()


def test_keys_and_grouping_are_the_webdataset_library_ones(tmp_path):
    wds = pytest.importorskip("webdataset")
    members = [
        ("a/x.jpg", jpeg(8, 6)),
        ("a/x.json", ann_json([((1, 1, 4, 3), 1)])),
        ("a/x.seg.png", jpeg(8, 6)),  # a second image-like member: the sample's image is the jpg
        ("y.v2.JPG", jpeg(5, 7)),  # key "y", suffix "v2.JPG": not an image suffix, so no image
        ("z.PNG", jpeg(9, 4)),
        ("__meta__", b"{}"),
    ]
    shard = write_tar(tmp_path / "s.tar", members)
    records = read_webdataset(shard)
    library = [s["__key__"] for s in wds.WebDataset(shard, shardshuffle=False, empty_check=False)]
    assert library == ["a/x", "y", "z"]
    assert records.keys() == ["a/x", "z"]
    assert records.path(0) == f"{shard}#a/x.jpg" and records.path(1) == f"{shard}#z.PNG"
    assert records.size(1) == (9, 4) and len(records.boxes_of(0)) == 1


def test_size_comes_from_the_image_header_when_the_json_has_none(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", jpeg(20, 10)),
            ("a.json", ann_json([((2, 2, 30, 5), 7)])),  # the box is clipped to the header's 20 px
            ("b.jpg", jpeg(12, 16)),  # no json: no boxes
            ("c.jpg", jpeg(12, 16)),
            ("c.json", ann_json([((1, 1, 3, 3), 7)], width=100, height=50)),  # the JSON's size wins
        ],
    )
    records = read_webdataset(shard)
    assert [records.size(i) for i in range(3)] == [(20, 10), (12, 16), (100, 50)]
    np.testing.assert_allclose(records.boxes_of(0), [[2, 2, 20, 7]])
    assert len(records.boxes_of(1)) == 0 and records.class_names == ("7",)


def test_category_ids_become_indices_and_names(tmp_path):
    named = json.dumps(
        {"annotations": [{"bbox": [0, 0, 4, 4], "category_id": 30, "category_name": "cat"}], "labels": [5]}
    )
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", jpeg(8, 8)),
            ("a.json", named.encode()),
            ("b.jpg", jpeg(8, 8)),
            ("b.json", ann_json([((0, 0, 2, 2), 12)])),
        ],
    )
    records = read_webdataset(shard)
    assert records.class_names == ("5", "12", "cat")
    assert records.box_labels.tolist() == [2, 1]
    assert records.labels_of(0).tolist() == [0, 2]
    conflicting = json.dumps({"annotations": [{"bbox": [0, 0, 4, 4], "category_id": 30, "category_name": "dog"}]})
    write_tar(tmp_path / "t.tar", [("c.jpg", jpeg(8, 8)), ("c.json", conflicting.encode())])
    with pytest.raises(ValueError, match=r"t\.tar: c: category 30 is named 'dog', elsewhere 'cat'"):
        read_webdataset(str(tmp_path))


def test_duplicate_keys_name_both_shards(tmp_path):
    first = write_tar(tmp_path / "a.tar", [("k1.jpg", jpeg(8, 8)), ("dup.jpg", jpeg(8, 8))])
    second = write_tar(tmp_path / "b.tar", [("dup.jpg", jpeg(8, 8))])
    with pytest.raises(ValueError, match=f"'dup' is in both {first} and {second}"):
        read_webdataset(tmp_path)
    split = write_tar(tmp_path / "c.tar", [("k.jpg", jpeg(8, 8)), ("m.jpg", jpeg(8, 8)), ("k.json", b"{}")])
    with pytest.raises(ValueError, match=f"'k' is twice in {split}"):
        read_webdataset(split)


def test_bad_samples_are_skipped_counted_and_logged_by_shard_and_key(tmp_path, caplog):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("good.jpg", jpeg(8, 8)),
            ("good.json", ann_json([((1, 1, 3, 3), 1)])),
            ("nojpg.json", ann_json([((1, 1, 3, 3), 1)])),
            ("notjson.jpg", jpeg(8, 8)),
            ("notjson.json", b"{not json"),
            ("badbox.jpg", jpeg(8, 8)),
            ("badbox.json", json.dumps({"annotations": [{"bbox": [1, 2, 3], "category_id": 1}]}).encode()),
            ("broken.jpg", b"this is no jpeg"),
        ],
    )
    with caplog.at_level(logging.WARNING):
        records = read_webdataset(shard)
    assert records.keys() == ["good"]
    text = caplog.text
    assert f"1 samples without an image (skipped) ({shard}: nojpg" in text
    assert f"2 samples with invalid JSON (skipped) ({shard}: notjson (invalid JSON" in text
    assert f"{shard}: badbox (annotation #0: 'bbox' must be 4 numbers [x, y, w, h], got [1, 2, 3])" in text
    assert f"1 samples whose image size cannot be read (skipped) ({shard}: broken" in text


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"width": 10}, "leave out both sizes"),
        ({"width": True, "height": 4}, "'width' must be a number"),
        ({"width": float("nan"), "height": 4}, "'width' must be a number"),
        ({"annotations": [{"bbox": [0, 0, 1, 1], "category_id": "3"}]}, "'category_id' must be an integer"),
        ({"annotations": [{"bbox": [0, 0, 1, 1], "category_id": 2.5}]}, "'category_id' must be an integer"),
        ({"annotations": [{"bbox": "0 0 1 1", "category_id": 1}]}, "'bbox' must be 4 numbers"),
        ({"annotations": {"bbox": [0, 0, 1, 1]}}, "must be lists"),
        ({"labels": [1, None]}, "'labels' entries must be an integer"),
    ],
)
def test_invalid_annotation_fields_are_named(obj, message):
    with pytest.raises(ValueError, match=message):
        parse_annotations(json.dumps(obj).encode())


def test_crowd_annotations_give_a_label_but_no_box():
    ann = parse_annotations(
        json.dumps({"annotations": [{"bbox": [0, 0, 5, 5], "category_id": 4, "iscrowd": 1}], "labels": [9]}).encode()
    )
    assert ann.boxes.shape == (0, 4) and ann.categories == [4, 9] and ann.size is None


def test_shard_specs_and_their_errors(tmp_path):
    a = write_tar(tmp_path / "train-000000.tar", [("k.jpg", jpeg(8, 8))])
    b = write_tar(tmp_path / "train-000001.tar", [("m.jpg", jpeg(8, 8))])
    (tmp_path / ".train-000002.tar.tmp").write_bytes(b"")  # an unfinished write is not a shard
    assert expand_shards(tmp_path) == [a, b] == expand_shards(tmp_path / "train-{000000..000001}.tar")
    assert expand_shards(a) == [a]
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards not found.*train-000002\.tar"):
        expand_shards(tmp_path / "train-{000000..000002}.tar")
    with pytest.raises(ValueError, match="uncompressed .tar"):
        expand_shards(tmp_path / "train-{000000..000001}.tar.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .tar shards in this folder"):
        expand_shards(empty)
    (empty / "bad.tar").write_bytes(b"\x01" * 1024)
    with pytest.raises(ValueError, match=r"bad\.tar: not a readable uncompressed tar shard"):
        read_webdataset(empty)


def test_missing_members_and_changed_shards(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("k.jpg", jpeg(8, 8))])
    with pytest.raises(FileNotFoundError, match=r"no such member in the shard: '.*s\.tar#nope\.jpg'"):
        load_image(f"{shard}#nope.jpg")
    with pytest.raises(FileNotFoundError, match=r"shard not found: '.*other\.tar#k\.jpg'"):
        image_size(tmp_path / "other.tar#k.jpg")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "plain.jpg")
    assert load_image(f"{shard}#k.jpg").size == (8, 8)
    os.remove(shard)
    write_tar(tmp_path / "s.tar", [("x.json", b"{}" * 300), ("k.jpg", jpeg(10, 6))])  # same name, new content
    assert load_image(f"{shard}#k.jpg").size == (10, 6)


def test_write_shards_never_overwrites(scenes, tmp_path):
    coco = read_coco(scenes / "annotations.json", scenes / "images")
    write_shards(coco.subset([0, 1, 2]), tmp_path, samples_per_shard=2)
    before = (tmp_path / "shard-000000.tar").read_bytes()
    with pytest.raises(FileExistsError, match="shard-000000.tar"):
        write_shards(coco, tmp_path, samples_per_shard=2)
    assert (tmp_path / "shard-000000.tar").read_bytes() == before
    assert not (tmp_path / "shard-000002.tar").exists()


def test_format_is_registered():
    assert "webdataset" in FORMATS
    with pytest.raises(ValueError, match="takes no --annotations"):
        load_records("webdataset", annotations="x.json", images="shards")


@pytest.mark.parametrize("workers", [1, 2])
def test_propose_runs_end_to_end_and_keys_the_store_by_sample_key(shards, tmp_path, workers):
    folder, _ = shards
    out = tmp_path / "store"
    argv = [
        "propose",
        "--backend",
        "random",
        "--format",
        "webdataset",
        "--images",
        str(folder / "shard-{000000..000001}.tar"),
    ]
    rc = main(
        [*argv, "--out", str(out), "--workers", str(workers), "--shard-size", "4", "--topk", "20", "--no-progress"]
    )
    assert rc == 0
    records = read_webdataset(folder)
    store = ProposalStore.open(out, records)  # checks keys and sizes against the records
    assert list(store.keys) == records.keys() == [f"{i:06d}" for i in range(16)]
    assert store.meta["counts"]["failed"] == 0 and (store.counts() == 20).all()
    assert (store.boxes[:, 2] <= 64).all() and (store.boxes[:, 3] <= 64).all()


def test_propose_rejects_annotations_for_webdataset(shards, tmp_path, capsys):
    argv = ["propose", "--backend", "random", "--format", "webdataset", "--images", str(shards[0])]
    assert main([*argv, "--annotations", "x.json", "--out", str(tmp_path / "s")]) == 2
    assert "takes no --annotations" in capsys.readouterr().err
