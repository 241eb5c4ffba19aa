"""Pascal VOC XML reader."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from objcrop.data._common import build_records
from objcrop.data.images import image_size
from objcrop.data.records import Records

__all__ = ["VOC_CLASSES", "read_voc"]

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@dataclass
class _VocFile:
    """One parsed XML: file name, size (0 when absent) and objects."""

    filename: str
    width: int
    height: int
    names: list[str] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text is not None else None


def _parse(xml_path: Path) -> _VocFile:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{xml_path}: invalid XML: {err}") from err
    filename = _text(root, "filename") or f"{xml_path.stem}.jpg"
    size = root.find("size")
    try:
        width = int(float(_text(size, "width") or 0)) if size is not None else 0
        height = int(float(_text(size, "height") or 0)) if size is not None else 0
    except ValueError as err:
        raise ValueError(f"{xml_path}: invalid <size>: {err}") from err
    out = _VocFile(filename, width, height)
    for k, obj in enumerate(root.iter("object")):
        name = _text(obj, "name")
        bndbox = obj.find("bndbox")
        if not name or bndbox is None:
            raise ValueError(f"{xml_path}: object #{k}: missing <name> or <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bndbox, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
            difficult = bool(int(float(_text(obj, "difficult") or 0)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{xml_path}: object #{k} ({name}): invalid <bndbox> or <difficult>: {err}") from err
        out.names.append(name)
        # VOC pixel coordinates are 1-based and inclusive: pixel i covers [i - 1, i] in 0-based xyxy.
        out.boxes.append([x1 - 1, y1 - 1, x2, y2])
        out.difficult.append(difficult)
    return out


def _xml_files(annotations: Path) -> list[Path]:
    """XMLs of an Annotations folder, or those named by an ImageSets list file (one id per line)."""
    if annotations.is_dir():
        return sorted(annotations.glob("*.xml"))
    if not annotations.is_file():
        raise FileNotFoundError(2, "VOC annotations not found", str(annotations))
    # VOC layout: <root>/ImageSets/Main/<split>.txt next to <root>/Annotations.
    xml_dir = annotations.parent.parent.parent / "Annotations"
    ids = []
    with open(annotations, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if parts:
                ids.append(parts[0])  # class lists ("000005 -1") carry a flag after the id
    files = [xml_dir / f"{i}.xml" for i in ids]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(2, f"annotation listed in {annotations} not found", str(p))
    return files


def read_voc(
    annotations: str | os.PathLike,
    images_dir: str | os.PathLike,
    keep_difficult: bool = True,
    class_names: Sequence[str] | None = None,
) -> Records:
    """Reads Pascal VOC XML annotations.

    VOC's 1-based inclusive pixel coordinates become 0-based xyxy ``(xmin - 1, ymin - 1, xmax, ymax)``.
    Image-level labels are the classes of all objects, difficult ones included (they are in the
    image); ``keep_difficult=False`` only drops their boxes. Sizes come from ``<size>``, or from the
    image header when the XML has none.

    Args:
        annotations: The ``Annotations`` folder (every XML in it) or an ``ImageSets`` list file such
            as ``VOC2007/ImageSets/Main/trainval.txt`` (XMLs then in ``VOC2007/Annotations``).
        images_dir: Folder holding the images named by ``<filename>`` (``JPEGImages``).
        keep_difficult: Keep boxes of objects marked difficult.
        class_names: The class list. Default: the 20 VOC classes in their usual order when every name
            found is one of them, else the sorted names found.

    Returns:
        Records in file order; image ids are the numeric file stems when all stems are numbers.
    """
    annotations = Path(annotations)
    xml_paths = _xml_files(annotations)
    files = [_parse(p) for p in xml_paths]
    found = {name for f in files for name in f.names}
    if class_names is None:
        class_names = VOC_CLASSES if found <= set(VOC_CLASSES) else sorted(found)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = found - set(index)
    if unknown:
        raise ValueError(f"{annotations}: classes not in class_names: {sorted(unknown)}")

    paths, widths, heights = [], [], []
    boxes, box_labels, box_image, labels, label_image = [], [], [], [], []
    for i, f in enumerate(files):
        width, height = f.width, f.height
        if width < 1 or height < 1:
            width, height = image_size(os.path.join(images_dir, f.filename))
        paths.append(f.filename)
        widths.append(width)
        heights.append(height)
        for name, box, difficult in zip(f.names, f.boxes, f.difficult, strict=True):
            labels.append(index[name])
            label_image.append(i)
            if keep_difficult or not difficult:
                boxes.append(box)
                box_labels.append(index[name])
                box_image.append(i)

    numeric = bool(xml_paths) and all(p.stem.isdigit() for p in xml_paths)
    return build_records(
        root=images_dir,
        paths=paths,
        widths=widths,
        heights=heights,
        boxes=boxes,
        box_labels=box_labels,
        box_image=box_image,
        labels=labels,
        label_image=label_image,
        class_names=class_names,
        image_ids=[int(p.stem) for p in xml_paths] if numeric else None,
        source=annotations,
    )
