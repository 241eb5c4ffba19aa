import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from objcrop.cli import COMMANDS
from objcrop.commands import openimages_subset as openimages_subset_command
from objcrop.data.openimages import IDS_HEADER, openimages_subset, read_class_descriptions, read_openimages

HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"


def _boxes_csv(path: Path, rows: list[tuple]) -> Path:
    """rows: (image, label, xmin, xmax, ymin, ymax)."""
    lines = [HEADER] + [f"{i},xclick,{m},1,{x1},{x2},{y1},{y2},0,0,0,0,0" for i, m, x1, x2, y1, y2 in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _labels_csv(path: Path, rows: list[tuple]) -> Path:
    rows_text = "".join(f"{i},verification,{m},{c}\n" for i, m, c in rows)
    path.write_text("ImageID,Source,LabelName,Confidence\n" + rows_text)
    return path


def _image(path: Path, width: int, height: int, orientation: int | None = None) -> None:
    kwargs = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    Image.new("RGB", (width, height)).save(path, **kwargs)


@pytest.fixture
def dataset(tmp_path):
    images = tmp_path / "train"
    images.mkdir()
    _image(images / "bbb.jpg", 100, 50)
    _image(images / "aaa.jpg", 80, 40, orientation=6)  # upright 40 x 80
    boxes = _boxes_csv(
        tmp_path / "boxes.csv",
        [
            ("bbb", "/m/cat", 0.1, 0.5, 0.2, 0.6),
            ("aaa", "/m/dog", 0.0, 1.0, 0.0, 0.5),
            ("aaa", "/m/dog", 0.5, 0.4, 0.0, 0.5),  # XMin > XMax: dropped
            ("ccc", "/m/car", 0.0, 1.0, 0.0, 1.0),  # image not on disk
        ],
    )
    labels = _labels_csv(
        tmp_path / "labels.csv",
        [("bbb", "/m/zebra", 1), ("bbb", "/m/dog", 0), ("zzz", "/m/whale", 1), ("aaa", "/m/dog", 1)],
    )
    classes = tmp_path / "classes.csv"
    classes.write_text("/m/cat,Cat\n/m/dog,Dog\n/m/car,Car\n/m/whale,Whale\n")
    return boxes, images, labels, classes


def test_read_openimages_scales_by_header_sizes_and_skips_missing_images(dataset, caplog):
    boxes, images, _, _ = dataset
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_openimages(boxes, images)
    assert r.keys() == ["aaa.jpg", "bbb.jpg"]
    assert r.image_ids.tolist() == [0, 1]
    assert r.class_names == ("/m/car", "/m/cat", "/m/dog")
    assert r.size(0) == (40, 80)
    np.testing.assert_allclose(r.boxes_of(0), [[0, 0, 40, 40]])
    np.testing.assert_allclose(r.boxes_of(1), [[10, 10, 50, 30]], rtol=1e-6)
    assert r.box_labels_of(1).tolist() == [1] and r.labels_of(1).tolist() == [1]
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("1 images missing on disk" in m and "ccc.jpg" in m for m in messages)
    assert any("1 bad boxes" in m and "aaa" in m for m in messages)


def test_read_openimages_adds_positive_image_labels_and_display_names(dataset, caplog):
    boxes, images, labels, classes = dataset
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_openimages(boxes, images, labels_csv=labels, classes_csv=classes)
    assert r.class_names == ("Car", "Cat", "Dog", "/m/zebra")  # sorted by LabelName; zebra has no description
    assert [r.class_names[c] for c in r.labels_of(1)] == ["Cat", "/m/zebra"]  # Confidence 0 for dog ignored
    assert [r.class_names[c] for c in r.labels_of(0)] == ["Dog"]
    assert any("no description" in rec.getMessage() for rec in caplog.records)


def test_class_descriptions_with_or_without_header(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('LabelName,DisplayName\n/m/a,Apple\n/m/b,"Bee, honey"\n')
    assert read_class_descriptions(path) == {"/m/a": "Apple", "/m/b": "Bee, honey"}
    path.write_text("/m/a,Apple\n")
    assert read_class_descriptions(path) == {"/m/a": "Apple"}
    path.write_text("/m/a\n")
    with pytest.raises(ValueError, match="c.csv: line 1"):
        read_class_descriptions(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ImageID,LabelName,XMin,XMax,YMin\na,/m/x,0,1,0\n", r"boxes.csv: missing columns \['YMax'\]"),
        ("ImageID,LabelName,XMin,XMax,YMin,YMax\na,/m/x,0,1,0,1\nb,/m/x,0,one,0,1\n", "boxes.csv:3: non-numeric XMax"),
        ("ImageID,LabelName,XMin,XMax,YMin,YMax\na,/m/x,0,1\n", "boxes.csv:2: expected at least 6 fields"),
        ("", "boxes.csv: empty CSV"),
    ],
)
def test_malformed_boxes_csv_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "boxes.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_openimages(path, tmp_path)


def test_subset_needs_image_and_label_columns(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("ImageID,XMin\na,0\n")
    with pytest.raises(ValueError, match=r"boxes.csv: missing columns \['LabelName'\]"):
        openimages_subset(path)
    path.write_text("")
    with pytest.raises(ValueError, match="boxes.csv: empty CSV"):
        openimages_subset(path)


def test_malformed_labels_csv(dataset, tmp_path):
    boxes, images, _, _ = dataset
    bad = tmp_path / "bad_labels.csv"
    bad.write_text("ImageID,LabelName,Confidence\naaa,/m/dog,yes\n")
    with pytest.raises(ValueError, match="bad_labels.csv:2: non-numeric Confidence"):
        read_openimages(boxes, images, labels_csv=bad)
    bad.write_text("ImageID,LabelName\naaa,/m/dog\n")
    with pytest.raises(ValueError, match=r"missing columns \['Confidence'\]"):
        openimages_subset(boxes, labels_csv=bad)


# ---------------------------------------------------------------- subset

# Images A..E; classes per image (boxes): A cat cat dog, B cat car, C dog bus, D bus, E car tree.
SUBSET_BOXES = [
    ("A", "/m/cat", 0, 1, 0, 1),
    ("A", "/m/cat", 0, 1, 0, 1),
    ("A", "/m/dog", 0, 1, 0, 1),
    ("B", "/m/cat", 0, 1, 0, 1),
    ("B", "/m/car", 0, 1, 0, 1),
    ("C", "/m/dog", 0, 1, 0, 1),
    ("C", "/m/bus", 0, 1, 0, 1),
    ("D", "/m/bus", 0, 1, 0, 1),
    ("E", "/m/car", 0, 1, 0, 1),
    ("E", "/m/tree", 0, 1, 0, 1),
]
SUBSET_LABELS = [("D", "/m/tree", 1), ("E", "/m/bus", 1), ("D", "/m/car", 0), ("F", "/m/cat", 1)]


def test_subset_from_boxes_only(tmp_path):
    s = openimages_subset(_boxes_csv(tmp_path / "b.csv", SUBSET_BOXES), min_images_per_class=2, min_classes_per_image=2)
    # Classes in >= 2 images: cat {A,B}, dog {A,C}, car {B,E}, bus {C,D}; tree {E} is dropped.
    # Images with >= 2 kept classes: A (cat, dog), B (cat, car), C (dog, bus); D and E have one each.
    assert s.image_ids == ["A", "B", "C"]
    assert s.class_ids == ["/m/bus", "/m/car", "/m/cat", "/m/dog"]
    assert s.class_image_counts.tolist() == [1, 1, 2, 2]
    assert s.counts() == {
        "images_before": 5,
        "images_after": 3,
        "classes_before": 5,
        "classes_after": 4,
        "boxes_before": 10,
        "boxes_after": 7,
        "min_images_in_a_kept_class": 1,
    }


def test_subset_with_positive_image_labels(tmp_path):
    boxes = _boxes_csv(tmp_path / "b.csv", SUBSET_BOXES)
    labels = _labels_csv(tmp_path / "l.csv", SUBSET_LABELS)
    s = openimages_subset(boxes, labels, min_images_per_class=2, min_classes_per_image=2)
    # tree gains D, bus gains E; D's car has Confidence 0 and F has no boxes, so both are ignored.
    assert s.image_ids == ["A", "B", "C", "D", "E"]
    assert s.class_ids == ["/m/bus", "/m/car", "/m/cat", "/m/dog", "/m/tree"]
    assert s.class_image_counts.tolist() == [3, 2, 2, 2, 2]
    assert s.boxes_after == 10
    s = openimages_subset(boxes, labels, min_images_per_class=3, min_classes_per_image=2)
    assert s.class_ids == ["/m/bus"] and s.image_ids == [] and s.boxes_after == 0


def _run_command(argv: list[str]) -> int:
    """Runs the subcommand through its own parser (``objcrop.cli`` would import every command)."""
    parser = argparse.ArgumentParser()
    openimages_subset_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_subset_command_prints_counts_and_writes_ids(tmp_path, capsys):
    assert "objcrop.commands.openimages_subset" in COMMANDS
    boxes = _boxes_csv(tmp_path / "b.csv", SUBSET_BOXES)
    out = tmp_path / "ids.txt"
    argv = ["openimages-subset", "--boxes", str(boxes), "--min-class-images", "2", "--out", str(out), "--json"]
    assert _run_command(argv) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["images_after"] == 3 and counts["classes_after"] == 4
    assert out.read_text() == f"{IDS_HEADER}\nA\nB\nC\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert _run_command(["openimages-subset", "--boxes", str(boxes), "--min-class-images", "2"]) == 0
    text = capsys.readouterr().out
    assert "images_after" in text and "rows/s" in text
    with pytest.raises(ValueError, match="--min-classes"):
        _run_command(["openimages-subset", "--boxes", str(boxes), "--min-classes", "0"])
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        _run_command(["openimages-subset", "--boxes", str(tmp_path / "missing.csv")])


def test_subset_command_replaces_only_id_lists_it_wrote(tmp_path, capsys):
    boxes = _boxes_csv(tmp_path / "b.csv", SUBSET_BOXES)
    out = tmp_path / "ids.txt"
    argv = ["openimages-subset", "--boxes", str(boxes), "--min-class-images", "2", "--out", str(out)]
    out.write_text("A\nB\n")  # the user's own list (or one written before the header existed)
    with pytest.raises(ValueError, match=f"{out} was not written by objcrop") as err:
        _run_command(argv)
    assert "choose another --out" in str(err.value)
    assert out.read_text() == "A\nB\n"
    out.write_text(f"{IDS_HEADER}\nold\n")  # objcrop's own list: replaced
    assert _run_command(argv) == 0
    assert out.read_text() == f"{IDS_HEADER}\nA\nB\nC\n"
    capsys.readouterr()
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        _run_command([*argv[:-1], str(tmp_path / "dir")])
