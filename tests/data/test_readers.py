import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from objcrop.data.coco import read_coco
from objcrop.data.folder import read_folder
from objcrop.data.readers import FORMATS, load_records
from objcrop.data.voc import VOC_CLASSES, read_voc
from objcrop.data.yolo import MAX_UNNAMED_CLASSES, read_class_names, read_yolo
from tests.conftest import SHARED_DATA, needs_shared_data

DATA = SHARED_DATA
COCO128 = DATA / "coco128"


def _image(path: Path, width: int, height: int, exif_orientation: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    Image.new("RGB", (width, height), (90, 120, 150)).save(path, **kwargs)


# ---------------------------------------------------------------- COCO


def _coco(tmp_path: Path, annotations: list, name: str = "instances.json", **extra) -> Path:
    data = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 20, "file_name": "b.jpg", "width": 50, "height": 40},
            {"id": 30, "file_name": "sub/c.jpg", "width": 30, "height": 30},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
        "annotations": annotations,
        **extra,
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    for image in data["images"]:  # the reader skips images missing on disk
        _image(tmp_path / image["file_name"], 4, 4)
    return path


def _ann(aid, image_id, category_id, bbox, iscrowd=0):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


def test_coco_maps_sparse_category_ids_in_sorted_order_and_keeps_ids_sizes(tmp_path):
    path = _coco(
        tmp_path,
        [_ann(1, 10, 7, [10, 20, 30, 40]), _ann(2, 10, 1, [0, 0, 5, 5]), _ann(3, 20, 3, [1, 2, 3, 4])],
    )
    r = read_coco(path, tmp_path)
    assert r.class_names == ("one", "three", "seven")
    assert r.keys() == ["a.jpg", "b.jpg", "sub/c.jpg"]
    assert r.path(2) == str(tmp_path / "sub" / "c.jpg")
    assert r.image_ids.tolist() == [10, 20, 30]
    assert r.size(0) == (100, 80) and r.size(1) == (50, 40)
    np.testing.assert_allclose(r.boxes_of(0), [[10, 20, 40, 60], [0, 0, 5, 5]])
    assert r.box_labels_of(0).tolist() == [2, 0]
    assert r.labels_of(0).tolist() == [0, 2]
    assert r.box_labels_of(1).tolist() == [1]
    assert len(r.boxes_of(2)) == 0 and len(r.labels_of(2)) == 0  # no annotations: kept, no boxes


def test_coco_crowd_boxes_are_excluded_but_label_the_image(tmp_path):
    path = _coco(tmp_path, [_ann(1, 20, 7, [0, 0, 10, 10], iscrowd=1), _ann(2, 20, 1, [1, 1, 5, 5])])
    r = read_coco(path, tmp_path)
    assert r.box_labels_of(1).tolist() == [0]
    assert r.labels_of(1).tolist() == [0, 2]


def test_coco_bad_boxes_are_dropped_or_clipped_and_logged_once(tmp_path, caplog):
    anns = [
        _ann(1, 10, 1, [float("nan"), 0, 10, 10]),
        _ann(2, 10, 1, [10, 10, -5, 10]),  # negative width
        _ann(3, 10, 1, [10, 10, 0, 10]),  # zero area
        _ann(4, 10, 1, [200, 200, 10, 10]),  # outside the 100x80 image
        _ann(5, 10, 1, [90, 70, 30, 30]),  # partly outside: clipped
        _ann(6, 10, 1, [float("inf"), 0, 10, 10]),
        _ann(7, 20, 3, [0, 0, 10, 10]),
    ]
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_coco(_coco(tmp_path, anns), tmp_path)
    np.testing.assert_allclose(r.boxes_of(0), [[90, 70, 100, 80]])
    assert len(r.boxes) == 2
    warnings = [rec.getMessage() for rec in caplog.records if "bad boxes" in rec.getMessage()]
    assert len(warnings) == 1
    assert "5 bad boxes" in warnings[0] and "a.jpg" in warnings[0] and "instances.json" in warnings[0]


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ([_ann(1, 10, 99, [0, 0, 1, 1])], "annotation 1: unknown category_id 99"),
        ([_ann(2, 99, 1, [0, 0, 1, 1])], "annotation 2: unknown image_id 99"),
        ([_ann(3, 10, 1, [0, 0, 1])], "annotation 3: 'bbox' must be 4 numbers"),
        ([_ann(4, 10, 1, ["x", 0, 1, 1])], "annotation 4: 'bbox' must be 4 numbers"),
        ([{"id": 5, "image_id": 10, "bbox": [0, 0, 1, 1]}], "annotation 5: missing or invalid 'category_id'"),
    ],
)
def test_coco_malformed_annotations_name_file_and_record(tmp_path, annotations, message):
    path = _coco(tmp_path, annotations)
    with pytest.raises(ValueError, match=message) as info:
        read_coco(path, tmp_path)
    assert "instances.json" in str(info.value)


def test_coco_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        read_coco(bad, tmp_path)
    bad.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match="no 'images' list"):
        read_coco(bad, tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "width": 0, "height": 5}], "categories": []}))
    with pytest.raises(ValueError, match=r"image 1 \(x.jpg\): invalid size 0x5 \(not positive\)"):
        read_coco(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_coco(tmp_path / "missing.json", tmp_path)


@needs_shared_data("coco128/annotations", "coco128/train2017")
def test_coco128_counts():
    r = read_coco(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "train2017")
    assert len(r) == 128 and len(r.boxes) == 929 and r.num_classes == 80
    assert r.class_names[0] == "person" and r.class_names[-1] == "toothbrush"
    no_boxes = [r.key(i) for i in range(len(r)) if len(r.boxes_of(i)) == 0]
    assert no_boxes == ["000000000250.jpg", "000000000508.jpg"]
    assert len(np.unique(r.box_labels)) == 71
    assert all(Path(r.path(i)).is_file() for i in range(len(r)))
    for i in (0, 50, 127):  # JSON sizes agree with the image headers
        assert Image.open(r.path(i)).size == r.size(i)


# ---------------------------------------------------------------- VOC


def _voc_xml(filename, objects, size=(100, 80)) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, diff in objects
    )
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def _voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    xmls = {
        "000001": _voc_xml("000001.jpg", [("dog", (1, 1, 50, 40), False), ("person", (10, 5, 120, 60), True)]),
        "000002": _voc_xml("000002.jpg", [("cat", (20, 30, 20, 30), False), ("cat", (2, 2, 30, 30), False)]),
        "000003": _voc_xml("000003.jpg", []),
    }
    for stem, text in xmls.items():
        (root / "Annotations" / f"{stem}.xml").write_text(text)
        _image(root / "JPEGImages" / f"{stem}.jpg", 4, 4)  # the reader skips images missing on disk
    (root / "ImageSets" / "Main" / "train.txt").write_text("000003\n000001\n")
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("000001  1\n000002 -1\n")
    return root


def test_voc_converts_one_based_coordinates_and_keeps_difficult(tmp_path, caplog):
    root = _voc(tmp_path)
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_voc(root / "Annotations", root / "JPEGImages")
    assert r.class_names == VOC_CLASSES
    assert r.keys() == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert r.image_ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(r.boxes_of(0), [[0, 0, 50, 40], [9, 4, 100, 60]])  # second clipped to width 100
    assert [r.class_names[c] for c in r.box_labels_of(0)] == ["dog", "person"]
    assert [r.class_names[c] for c in r.labels_of(0)] == ["dog", "person"]
    np.testing.assert_allclose(r.boxes_of(1), [[19, 29, 20, 30], [1, 1, 30, 30]])  # a one-pixel VOC box is kept
    assert len(r.boxes_of(2)) == 0
    assert not any("bad boxes" in rec.getMessage() for rec in caplog.records)


def test_voc_can_drop_difficult_boxes_but_keeps_their_label(tmp_path):
    root = _voc(tmp_path)
    r = read_voc(root / "Annotations", root / "JPEGImages", keep_difficult=False)
    assert [r.class_names[c] for c in r.box_labels_of(0)] == ["dog"]
    assert [r.class_names[c] for c in r.labels_of(0)] == ["dog", "person"]


def test_voc_reads_an_imagesets_list(tmp_path):
    root = _voc(tmp_path)
    r = read_voc(root / "ImageSets" / "Main" / "train.txt", root / "JPEGImages")
    assert r.keys() == ["000003.jpg", "000001.jpg"]
    r = read_voc(root / "ImageSets" / "Main" / "dog_train.txt", root / "JPEGImages")
    assert r.keys() == ["000001.jpg", "000002.jpg"]
    (root / "ImageSets" / "Main" / "val.txt").write_text("000009\n")
    with pytest.raises(FileNotFoundError, match="000009.xml"):
        read_voc(root / "ImageSets" / "Main" / "val.txt", root / "JPEGImages")


def test_voc_bad_boxes_are_dropped_and_counted(tmp_path, caplog):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    objects = [("car", (50, 50, 40, 60), False), ("car", (300, 300, 400, 400), False), ("car", (5, 5, 9, 9), False)]
    (ann / "x.xml").write_text(_voc_xml("x.jpg", objects))
    _image(tmp_path / "x.jpg", 4, 4)
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_voc(ann, tmp_path)
    assert len(r.boxes) == 1
    assert any("2 bad boxes" in rec.getMessage() and "x.jpg" in rec.getMessage() for rec in caplog.records)


def test_voc_unknown_names_give_sorted_classes_and_missing_size_reads_header(tmp_path):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    (ann / "img_b.xml").write_text(_voc_xml("img_b.png", [("zebra", (1, 1, 5, 5), False)], size=None))
    (ann / "img_a.xml").write_text(_voc_xml("img_a.png", [("ant", (1, 1, 5, 5), False)]))
    _image(tmp_path / "images" / "img_b.png", 33, 22)
    _image(tmp_path / "images" / "img_a.png", 4, 4)
    r = read_voc(ann, tmp_path / "images")
    assert r.class_names == ("ant", "zebra")
    assert r.size(1) == (33, 22)
    assert r.image_ids.tolist() == [0, 1]  # stems are not numbers: running indices
    with pytest.raises(ValueError, match="classes not in class_names"):
        read_voc(ann, tmp_path / "images", class_names=["ant"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotation><object>", "invalid XML"),
        ("<annotation><object><name>dog</name></object></annotation>", "object #0: missing <name> or <bndbox>"),
        (_voc_xml("x.jpg", [("dog", (1, 1, "x", 5), False)]), r"object #0 \(dog\): invalid <bndbox>"),
        (
            "<annotation><object><name>dog</name><bndbox><xmin>1</xmin></bndbox></object></annotation>",
            "invalid <bndbox>",
        ),
    ],
)
def test_voc_malformed_xml_names_the_file(tmp_path, text, message):
    (tmp_path / "bad.xml").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_voc(tmp_path, tmp_path)
    assert "bad.xml" in str(info.value)


# ---------------------------------------------------------------- YOLO


def _yolo(tmp_path: Path) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    _image(images / "1.jpg", 100, 50)
    _image(images / "2.png", 40, 40)
    _image(images / "3.jpg", 60, 30)  # no label file
    labels.mkdir()
    (labels / "1.txt").write_text("0 0.5 0.5 0.2 0.4\n\n2 0.1 0.1 0.2 0.2\n")
    (labels / "2.txt").write_text("1 0.25 0.25 0.5 0.75 0.75 0.5\n")  # polygon: a diamond
    (labels / "9.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # orphan
    return labels, images


def test_yolo_boxes_sizes_and_numbered_classes(tmp_path, caplog):
    labels, images = _yolo(tmp_path)
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_yolo(labels, images)
    assert r.keys() == ["1.jpg", "2.png", "3.jpg"]
    assert r.class_names == ("0", "1", "2")
    assert r.image_ids.tolist() == [1, 2, 3]
    assert r.size(0) == (100, 50)
    np.testing.assert_allclose(r.boxes_of(0), [[40, 15, 60, 35], [0, 0, 20, 10]], atol=1e-4)
    assert r.box_labels_of(0).tolist() == [0, 2] and r.labels_of(0).tolist() == [0, 2]
    np.testing.assert_allclose(r.boxes_of(1), [[10, 10, 30, 30]], atol=1e-4)
    assert len(r.boxes_of(2)) == 0
    assert any("9.txt" in rec.getMessage() and "no image" in rec.getMessage() for rec in caplog.records)


def test_yolo_sizes_follow_exif_orientation(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    _image(images / "r.jpg", 80, 40, exif_orientation=6)
    labels.mkdir()
    (labels / "r.txt").write_text("0 0.5 0.5 1 1\n")
    r = read_yolo(labels, images)
    assert r.size(0) == (40, 80)
    np.testing.assert_allclose(r.boxes_of(0), [[0, 0, 40, 80]])


def test_yolo_class_names_from_files(tmp_path):
    labels, images = _yolo(tmp_path)
    names_txt = tmp_path / "names.txt"
    names_txt.write_text("cat\ndog\nbird\n\n")
    assert read_yolo(labels, images, names_txt).class_names == ("cat", "dog", "bird")
    yaml_list = tmp_path / "data.yaml"
    yaml_list.write_text("path: x\nnames: [cat, dog, bird, fish]\n")
    assert read_yolo(labels, images, yaml_list).class_names == ("cat", "dog", "bird", "fish")
    yaml_map = tmp_path / "map.yml"
    yaml_map.write_text("names:\n  0: cat\n  1: dog\n  2: bird\n")
    assert read_class_names(yaml_map) == ["cat", "dog", "bird"]
    assert read_yolo(labels, images, ["a", "b", "c"]).class_names == ("a", "b", "c")
    with pytest.raises(ValueError, match=r"1.txt:3: class index 2 but only 2 class names"):
        read_yolo(labels, images, ["a", "b"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("nc: 3\n")
    with pytest.raises(ValueError, match="no 'names'"):
        read_class_names(bad_yaml)
    bad_yaml.write_text("names: {0: a, 2: b}\n")
    with pytest.raises(ValueError, match="keys must be 0..1"):
        read_class_names(bad_yaml)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2\n", "1.txt:2: expected 'class cx cy w h' or a polygon"),
        ("0 0.5 abc 0.2 0.2\n", "1.txt:2: non-numeric"),
        ("-1 0.5 0.5 0.2 0.2\n", "1.txt:2: class must be a non-negative integer"),
        ("1.5 0.5 0.5 0.2 0.2\n", "1.txt:2: class must be a non-negative integer"),
    ],
)
def test_yolo_malformed_lines_name_file_and_line(tmp_path, line, message):
    labels, images = _yolo(tmp_path)
    (labels / "1.txt").write_text("0 0.5 0.5 0.2 0.2\n" + line)
    with pytest.raises(ValueError, match=message):
        read_yolo(labels, images)


def test_yolo_bad_boxes_and_unreadable_images_are_counted_skips(tmp_path, caplog):
    labels, images = _yolo(tmp_path)
    (labels / "1.txt").write_text("0 0.5 0.5 0 0.2\n0 nan 0.5 0.2 0.2\n0 3.0 3.0 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    (images / "4.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_yolo(labels, images)
    assert r.keys() == ["1.jpg", "2.png", "3.jpg"]
    assert len(r.boxes_of(0)) == 1
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("3 bad boxes" in m and "1.jpg" in m for m in messages)
    assert any("unreadable images" in m and "4.jpg" in m for m in messages)


@needs_shared_data("coco128/annotations", "coco128/train2017", "coco128_yolo_labels/labels/train2017")
def test_yolo_labels_agree_with_coco_json_on_coco128():
    labels = DATA / "coco128_yolo_labels" / "labels" / "train2017"
    coco = read_coco(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "train2017")
    yolo = read_yolo(labels, COCO128 / "train2017")
    assert yolo.keys() == coco.keys()
    assert (yolo.image_ids == coco.image_ids).all()
    assert (yolo.widths == coco.widths).all() and (yolo.heights == coco.heights).all()
    assert (yolo.box_offsets == coco.box_offsets).all()
    assert (yolo.box_labels == coco.box_labels).all()  # YOLO class = index of the sorted COCO id
    np.testing.assert_allclose(yolo.boxes, coco.boxes, atol=0.01)


# ---------------------------------------------------------------- folder


def test_folder_with_class_subfolders_gives_image_labels(tmp_path):
    _image(tmp_path / "dog" / "1.jpg", 20, 10)
    _image(tmp_path / "cat" / "b.png", 12, 12)
    _image(tmp_path / "cat" / "deeper" / "a.jpg", 8, 16)
    (tmp_path / "cat" / "readme.txt").write_text("not an image")
    r = read_folder(tmp_path)
    assert r.keys() == ["cat/b.png", "cat/deeper/a.jpg", "dog/1.jpg"]
    assert r.class_names == ("cat", "dog")
    assert [r.labels_of(i).tolist() for i in range(3)] == [[0], [0], [1]]
    assert r.size(1) == (8, 16) and len(r.boxes) == 0


def test_flat_or_mixed_folder_has_no_classes(tmp_path, caplog):
    _image(tmp_path / "top.jpg", 20, 10)
    _image(tmp_path / "sub" / "x.jpg", 20, 10)
    (tmp_path / "broken.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_folder(tmp_path)
    assert r.keys() == ["sub/x.jpg", "top.jpg"]
    assert r.class_names == () and len(r.labels) == 0
    assert any("broken.jpg" in rec.getMessage() for rec in caplog.records)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        read_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_folder(tmp_path / "missing")


# ---------------------------------------------------------------- load_records


def test_load_records_dispatches_every_format(tmp_path):
    assert FORMATS[:5] == ("coco", "voc", "openimages", "yolo", "folder")
    coco = load_records("coco", annotations=_coco(tmp_path, []), images=tmp_path)
    assert len(coco) == 3
    root = _voc(tmp_path)
    assert len(load_records("voc", annotations=root / "Annotations", images=root / "JPEGImages")) == 3
    labels, images = _yolo(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    assert load_records("yolo", annotations=labels, images=images, classes_csv=names).class_names == ("a", "b", "c")
    assert len(load_records("folder", images=images)) == 3


@pytest.mark.parametrize(
    ("fmt", "kwargs", "message"),
    [
        ("coco", {"images": "x"}, "needs --annotations"),
        ("voc", {"annotations": "x"}, "needs --images"),
        ("yolo", {"images": "x"}, "needs --annotations"),
        ("openimages", {"images": "x"}, "needs --annotations"),
        ("folder", {"images": "x", "annotations": "y"}, "takes no --annotations"),
        ("coco", {"images": "x", "annotations": "y", "labels_csv": "z"}, "--labels-csv is only for"),
        ("voc", {"images": "x", "annotations": "y", "classes_csv": "z"}, "--classes-csv is only for"),
        ("pascal", {"images": "x"}, "unknown dataset format"),
    ],
)
def test_load_records_names_the_missing_flag(fmt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_records(fmt, **kwargs)


# ---------------------------------------------------------------- robustness


def test_coco_skips_images_missing_on_disk_with_their_annotations(tmp_path, caplog):
    path = _coco(tmp_path, [_ann(1, 10, 7, [1, 1, 5, 5]), _ann(2, 20, 1, [2, 2, 5, 5]), _ann(3, 30, 3, [3, 3, 5, 5])])
    (tmp_path / "b.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_coco(path, tmp_path)
    assert r.keys() == ["a.jpg", "sub/c.jpg"] and r.image_ids.tolist() == [10, 30]
    assert r.size(1) == (30, 30)
    np.testing.assert_allclose(r.boxes_of(1), [[3, 3, 8, 8]])
    assert [r.class_names[c] for c in r.labels_of(1)] == ["three"]
    warnings = [rec.getMessage() for rec in caplog.records if "missing on disk" in rec.getMessage()]
    assert len(warnings) == 1 and "1 images missing on disk" in warnings[0] and "b.jpg" in warnings[0]
    assert len(read_coco(path, tmp_path, check_images=False)) == 3


def test_coco_with_no_image_on_disk_is_an_error(tmp_path):
    path = _coco(tmp_path, [])
    with pytest.raises(ValueError, match=r"none of the 3 images exists \(the first is .*elsewhere/a.jpg\)"):
        read_coco(path, tmp_path / "elsewhere")


def test_voc_skips_missing_images_even_without_size(tmp_path, caplog):
    root = _voc(tmp_path)
    (root / "JPEGImages" / "000002.jpg").unlink()
    (root / "Annotations" / "000003.xml").write_text(_voc_xml("000003.jpg", [], size=None))
    (root / "JPEGImages" / "000003.jpg").write_bytes(b"not an image")  # no <size>: the header is needed
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_voc(root / "Annotations", root / "JPEGImages")
    assert r.keys() == ["000001.jpg"] and r.image_ids.tolist() == [1]
    messages = " ".join(rec.getMessage() for rec in caplog.records)
    assert "1 images missing on disk" in messages and "000002.jpg" in messages
    assert "unreadable images without <size>" in messages and "000003.jpg" in messages
    with pytest.raises(ValueError, match="none of the 3 images exists"):
        read_voc(root / "Annotations", tmp_path / "nowhere")


def test_folder_of_only_unreadable_images_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of the 2 images is readable"):
        read_folder(tmp_path)


@pytest.mark.parametrize("width", [1e12, 2**31, float("inf"), float("nan"), -3])
def test_coco_sizes_that_do_not_fit_are_rejected_naming_the_image(tmp_path, width):
    data = {"images": [{"id": 5, "file_name": "big.jpg", "width": width, "height": 10}], "categories": []}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    _image(tmp_path / "big.jpg", 4, 4)
    with pytest.raises(ValueError, match=r"instances.json: image 5 \(big.jpg\): invalid size"):
        read_coco(path, tmp_path)


def test_coco_image_id_that_does_not_fit_int64_is_rejected(tmp_path):
    data = {"images": [{"id": 10**30, "file_name": "a.jpg", "width": 4, "height": 4}], "categories": []}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances.json: image #0: id 10{30} does not fit int64"):
        read_coco(tmp_path / "instances.json", tmp_path)


def test_file_stems_are_image_ids_only_when_they_all_fit_int64(tmp_path):
    labels, images = _yolo(tmp_path)
    assert read_yolo(labels, images).image_ids.tolist() == [1, 2, 3]
    _image(images / f"{10**20}.jpg", 4, 4)  # numeric, but no int64
    assert read_yolo(labels, images).image_ids.tolist() == [0, 1, 2, 3]
    (images / f"{10**20}.jpg").unlink()
    _image(images / "\u00b2.jpg", 4, 4)  # "²".isdigit() is True, but int("²") fails
    assert read_yolo(labels, images).image_ids.tolist() == [0, 1, 2, 3]


def test_voc_size_that_does_not_fit_is_rejected_naming_the_image(tmp_path):
    (tmp_path / "x.xml").write_text(_voc_xml("x.jpg", [], size=(10**12, 10)))
    _image(tmp_path / "x.jpg", 4, 4)
    with pytest.raises(ValueError, match=r"x.xml: invalid <size> 1000000000000x10 \(larger than"):
        read_voc(tmp_path, tmp_path)
    (tmp_path / "x.xml").write_text(_voc_xml("x.jpg", [], size=("inf", 10)))
    with pytest.raises(ValueError, match=r"x.xml: invalid <size>"):
        read_voc(tmp_path, tmp_path)


BOUNDED_YOLO = """
import resource, sys
from objcrop.data.yolo import read_yolo

# Room for 1 GiB more than this process already maps: the old reader wanted ~24 GB of class names.
with open("/proc/self/status") as f:
    mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    read_yolo(sys.argv[1], sys.argv[2])
except ValueError as err:
    print(f"ValueError: {err}")
"""


def test_yolo_huge_class_id_is_an_error_naming_file_and_line_in_bounded_memory(tmp_path):
    labels, images = _yolo(tmp_path)
    (labels / "2.txt").write_text("0 0.5 0.5 0.2 0.2\n1e9 0.5 0.5 0.2 0.2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", BOUNDED_YOLO, str(labels), str(images)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ValueError: " in done.stdout and "2.txt:2: class '1e9' is beyond 9999" in done.stdout


def test_yolo_ids_below_the_bound_still_number_the_classes(tmp_path):
    labels, images = _yolo(tmp_path)
    (labels / "2.txt").write_text(f"{MAX_UNNAMED_CLASSES - 1} 0.5 0.5 0.2 0.2\n")
    assert read_yolo(labels, images).num_classes == MAX_UNNAMED_CLASSES
    (labels / "2.txt").write_text(f"{MAX_UNNAMED_CLASSES} 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"2.txt:1: class '10000' is beyond"):
        read_yolo(labels, images)


def test_yolo_label_file_that_is_not_utf8_is_named(tmp_path):
    labels, images = _yolo(tmp_path)
    (labels / "1.txt").write_bytes(b"0 0.5 0.5 0.2 0.2\n\xff\xfe garbage\n")
    with pytest.raises(ValueError, match=r"1.txt: not UTF-8 text"):
        read_yolo(labels, images)


def _bad_name(folder: Path, name: bytes) -> bytes:
    """Writes a small JPEG under a file name that is not valid UTF-8 (bytes paths) and returns its path."""
    path = os.path.join(os.fsencode(folder), name)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def test_folder_skips_and_counts_names_that_are_not_utf8(tmp_path, caplog):
    _image(tmp_path / "good.jpg", 20, 10)
    _image(tmp_path / "sub" / "ok.png", 8, 8)
    _bad_name(tmp_path, b"bad\xff.jpg")
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"dir\xfe"))
    _bad_name(tmp_path, b"dir\xfe/inside.jpg")
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_folder(tmp_path)
    assert r.keys() == ["good.jpg", "sub/ok.png"]
    messages = [rec.getMessage() for rec in caplog.records if "not valid UTF-8" in rec.getMessage()]
    assert len(messages) == 1 and "2 file or folder names" in messages[0]
    assert repr(b"bad\xff.jpg") in messages[0] and repr(b"dir\xfe/") in messages[0]


def test_yolo_skips_image_names_that_are_not_utf8(tmp_path, caplog):
    labels, images = _yolo(tmp_path)
    _bad_name(images, b"4\xff.jpg")
    with caplog.at_level(logging.WARNING, logger="objcrop"):
        r = read_yolo(labels, images)
    assert r.keys() == ["1.jpg", "2.png", "3.jpg"]
    assert any(repr(b"4\xff.jpg") in rec.getMessage() for rec in caplog.records)


def test_folder_does_not_follow_a_symlink_loop(tmp_path):
    _image(tmp_path / "a" / "1.jpg", 8, 8)
    _image(tmp_path / "b" / "2.jpg", 8, 8)
    (tmp_path / "a" / "loop").symlink_to("..", target_is_directory=True)  # a/loop/a/loop/... until ELOOP
    assert read_folder(tmp_path).keys() == ["a/1.jpg", "b/2.jpg"]


def test_folder_lists_each_folder_once_and_follows_links_out_of_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _image(root / "a" / "1.jpg", 8, 8)
    _image(root / "b" / "2.jpg", 8, 8)
    _image(outside / "3.jpg", 8, 8)
    (root / "a" / "to_b").symlink_to(root / "b", target_is_directory=True)  # b is listed under its own name
    (root / "c").symlink_to(outside, target_is_directory=True)  # a folder elsewhere is followed, once
    (root / "d").symlink_to(outside, target_is_directory=True)
    (outside / "again").symlink_to(outside, target_is_directory=True)  # a loop out there
    assert read_folder(root).keys() == ["a/1.jpg", "b/2.jpg", "c/3.jpg"]


# ---------------------------------------------------------------- contract: every registered format

# One tiny dataset, written in each format and read back: image -> ((width, height), [(class, xyxy box)]).
TINY_DATASET = {
    "a.jpg": ((64, 48), [("cat", (8, 4, 40, 36)), ("dog", (0, 0, 16, 16))]),
    "b.jpg": ((40, 40), [("dog", (10, 10, 30, 30))]),
    "c.jpg": ((30, 20), [("cat", (2, 2, 28, 18))]),
}
TINY_CLASSES = ("cat", "dog")


def _tiny_images(folder: Path) -> Path:
    for name, ((w, h), _) in TINY_DATASET.items():
        _image(folder / name, w, h)
    return folder


def _write_coco(root: Path) -> dict:
    images, annotations = [], []
    for i, (name, ((w, h), objects)) in enumerate(TINY_DATASET.items()):
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for c, (x1, y1, x2, y2) in objects:
            box = [x1, y1, x2 - x1, y2 - y1]
            annotations.append(_ann(len(annotations) + 1, i + 1, TINY_CLASSES.index(c) + 1, box))
    categories = [{"id": k + 1, "name": c} for k, c in enumerate(TINY_CLASSES)]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"annotations": path, "images": _tiny_images(root / "images")}


def _write_voc(root: Path) -> dict:
    (root / "Annotations").mkdir(parents=True)
    for name, (size, objects) in TINY_DATASET.items():
        one_based = [(c, (x1 + 1, y1 + 1, x2, y2), False) for c, (x1, y1, x2, y2) in objects]
        (root / "Annotations" / f"{Path(name).stem}.xml").write_text(_voc_xml(name, one_based, size))
    return {"annotations": root / "Annotations", "images": _tiny_images(root / "JPEGImages")}


def _write_openimages(root: Path) -> dict:
    rows = [HEADER_OPENIMAGES]
    for name, ((w, h), objects) in TINY_DATASET.items():
        for c, (x1, y1, x2, y2) in objects:
            rows.append(f"{Path(name).stem},xclick,/m/{c},1,{x1 / w},{x2 / w},{y1 / h},{y2 / h},0,0,0,0,0")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.csv").write_text("".join(f"/m/{c},{c}\n" for c in TINY_CLASSES))
    images = _tiny_images(root / "images")
    return {"annotations": root / "boxes.csv", "images": images, "classes_csv": root / "classes.csv"}


def _write_yolo(root: Path) -> dict:
    (root / "labels").mkdir(parents=True)
    for name, ((w, h), objects) in TINY_DATASET.items():
        lines = [
            f"{TINY_CLASSES.index(c)} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}"
            for c, (x1, y1, x2, y2) in objects
        ]
        (root / "labels" / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "names.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    return {"annotations": root / "labels", "images": _tiny_images(root / "images"), "classes_csv": root / "names.txt"}


def _write_folder(root: Path) -> dict:
    return {"images": _tiny_images(root / "images")}


def _write_webdataset(root: Path) -> dict:
    from objcrop.data.webdataset import write_shards

    write_shards(load_records("coco", **_write_coco(root / "coco")), root / "shards", samples_per_shard=2)
    return {"images": root / "shards"}


HEADER_OPENIMAGES = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
)
# How each registered format writes TINY_DATASET (its load_records arguments); a new format needs its line here.
FORMAT_WRITERS = {
    "coco": _write_coco,
    "voc": _write_voc,
    "openimages": _write_openimages,
    "yolo": _write_yolo,
    "folder": _write_folder,  # images only: no boxes
    "webdataset": _write_webdataset,
}


def test_every_registered_format_has_a_writer():
    assert set(FORMAT_WRITERS) == set(FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_the_tiny_dataset_it_wrote(fmt, tmp_path):
    records = load_records(fmt, **FORMAT_WRITERS[fmt](tmp_path))
    read = {}
    for i in range(len(records)):
        names = [records.class_names[k] for k in records.box_labels_of(i)]
        boxes = [tuple(np.round(b, 3).tolist()) for b in records.boxes_of(i)]
        read[Path(records.key(i)).stem] = (records.size(i), sorted(zip(names, boxes, strict=True)))
    with_boxes = fmt != "folder"
    expected = {
        Path(name).stem: (size, sorted((c, tuple(map(float, b))) for c, b in objects) if with_boxes else [])
        for name, (size, objects) in TINY_DATASET.items()
    }
    assert read == expected
