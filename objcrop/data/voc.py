"""Pascal VOC XML reader."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from objcrop.data._common import MAX_SIDE, SkipCounter, build_records, existing_images, ids_from_stems
from objcrop.data.images import ImageReadError, image_size
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
    except (ValueError, OverflowError) as err:  # "abc", NaN; inf
        raise ValueError(f"{xml_path}: invalid <size>: {err}") from err
    if max(width, height) > MAX_SIDE:
        raise ValueError(f"{xml_path}: invalid <size> {width}x{height} (larger than {MAX_SIDE} pixels)")
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
    check_images: bool = True,
) -> Records:
    """Reads Pascal VOC XML annotations.

    VOC's 1-based inclusive pixel coordinates become 0-based xyxy ``(xmin - 1, ymin - 1, xmax, ymax)``.
    Image-level labels are the classes of all objects, difficult ones included (they are in the
    image); ``keep_difficult=False`` only drops their boxes. Sizes come from ``<size>``, or from the
    image header when the XML has none. Images whose file is missing (or, without ``<size>``,
    unreadable) are skipped with their objects, counted and logged once.

    Args:
        annotations: The ``Annotations`` folder (every XML in it) or an ``ImageSets`` list file such
            as ``VOC2007/ImageSets/Main/trainval.txt`` (XMLs then in ``VOC2007/Annotations``).
        images_dir: Folder holding the images named by ``<filename>`` (``JPEGImages``).
        keep_difficult: Keep boxes of objects marked difficult.
        class_names: The class list. Default: the 20 VOC classes in their usual order when every name
            found is one of them, else the sorted names found.
        check_images: Skip images whose file is missing (off: read the XMLs alone; then every XML
            needs a ``<size>``).

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

    ok = existing_images(images_dir, [f.filename for f in files], annotations) if check_images else None
    unreadable = SkipCounter("unreadable images without <size> (skipped)", annotations)
    kept_xml, paths, widths, heights = [], [], [], []
    boxes, box_labels, box_image, labels, label_image = [], [], [], [], []
    for xml_path, f, exists in zip(xml_paths, files, ok if ok is not None else [True] * len(files), strict=True):
        if not exists:
            continue
        width, height = f.width, f.height
        if width < 1 or height < 1:
            try:
                width, height = image_size(os.path.join(images_dir, f.filename))
            except ImageReadError as err:
                unreadable.add(f.filename, reason=err.reason)
                continue
        i = len(paths)
        kept_xml.append(xml_path)
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
    unreadable.log()

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
        image_ids=ids_from_stems([p.stem for p in kept_xml]),
        source=annotations,
    )
