"""WebDataset tar shards: a reader, in-place member access and a writer.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by the webdataset
convention: the key is the member name up to the first dot of its base name, the rest is the suffix
(``train/000123.jpg`` and ``train/000123.json`` form sample ``train/000123``). A sample holds one
image (``jpg``, ``jpeg``, ``png``, ``bmp``, ``webp``, ``tif`` or ``tiff``) and optionally a
``json`` member with COCO-style boxes::

    {"width": 640, "height": 480,                                 # optional: read from the image when absent
     "annotations": [{"bbox": [x, y, w, h], "category_id": 3,     # COCO pixel box, any integer id
                      "category_name": "cat", "iscrowd": 0}],     # both optional
     "labels": [3, 7]}                                            # optional image-level category ids

Other members (``txt``, ``cls``, ...) are ignored, so OpenCLIP/img2dataset shards read as they are.
Records are keyed by the sample key, which must be unique across all shards; their paths are tar
member paths ``<shard.tar>#<member>`` that :func:`objcrop.data.images.load_image` opens through a
per-process index of each shard's members (built once per shard, no extraction).
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from objcrop.boxes import as_boxes, xywh_to_xyxy
from objcrop.data._common import SkipCounter, build_records
from objcrop.data.images import IMAGE_EXTENSIONS, ImageReadError, image_size_bytes
from objcrop.data.records import Records
from objcrop.io import atomic_open

__all__ = [
    "IMAGE_SUFFIXES",
    "ShardRecords",
    "SampleAnnotations",
    "expand_shards",
    "image_suffix",
    "parse_annotations",
    "read_member",
    "read_webdataset",
    "sample_key",
    "split_member_path",
    "write_shards",
]

SHARD_SUFFIX = ".tar"
MEMBER_SEPARATOR = "#"
# Image suffixes in order of preference, when a sample has more than one image.
IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# webdataset's own rules (webdataset.tariterators): the key/suffix split and the skipped metadata.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
_MEMBER_INDEX_CACHE = 8  # shards whose member index a process keeps (readers move through shards in order)


# ---------------------------------------------------------------------- shard lists and members


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """The shard files ``spec`` names: a folder (its ``*.tar`` files, sorted), a brace pattern
    (``shards/train-{000000..000009}.tar``, expanded by ``braceexpand`` as webdataset does) or one file.

    Raises:
        FileNotFoundError: A named shard does not exist (the first is named, with the count).
        ValueError: No shard, a shard that is not an uncompressed ``.tar``, or one named twice.
    """
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if n.endswith(SHARD_SUFFIX) and not n.startswith("."))
        if not names:
            raise ValueError(f"{spec}: no {SHARD_SUFFIX} shards in this folder")
        return [os.path.join(spec, n) for n in names]
    shards = [spec]
    if "{" in spec:
        try:
            from braceexpand import braceexpand
        except ImportError as err:  # installed with webdataset
            raise ValueError(f"shard pattern {spec!r} needs braceexpand: pip install webdataset") from err
        shards = list(braceexpand(spec))
    wrong = [s for s in shards if not s.endswith(SHARD_SUFFIX)]
    if wrong:
        raise ValueError(f"{wrong[0]}: shards must be uncompressed {SHARD_SUFFIX} files (members are read in place)")
    if len(set(shards)) != len(shards):
        raise ValueError(f"{spec}: names some shards more than once")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(errno.ENOENT, f"{len(missing)} of {len(shards)} shards not found, first", missing[0])
    return shards


def split_member_path(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(shard, member)`` of a member path ``<shard.tar>#<member>``, or None for any other path."""
    shard, sep, member = os.fspath(path).partition(SHARD_SUFFIX + MEMBER_SEPARATOR)
    if not sep or not shard or not member:
        return None
    return shard + SHARD_SUFFIX, member


@functools.lru_cache(maxsize=_MEMBER_INDEX_CACHE)
def _member_index(shard: str, stamp: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """``member name -> (data offset, size)`` of a shard; ``stamp`` (mtime, size) renews it when the file changes."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            return {info.name: (info.offset_data, info.size) for info in tar if info.isreg()}
    except tarfile.TarError as err:
        raise ValueError(f"{shard}: not a readable uncompressed tar shard ({err})") from err


def read_member(shard: str, member: str) -> bytes:
    """The bytes of ``member`` of ``shard``, read in place.

    Raises:
        FileNotFoundError: The shard or the member does not exist (the member path is named).
        ValueError: The shard is not a readable uncompressed tar.
    """
    path = f"{shard}{MEMBER_SEPARATOR}{member}"
    try:
        stat = os.stat(shard)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "shard not found", path) from None
    entry = _member_index(shard, (stat.st_mtime_ns, stat.st_size)).get(member)
    if entry is None:
        raise FileNotFoundError(errno.ENOENT, "no such member in the shard", path)
    offset, size = entry
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: shard truncated ({len(data)} of {size} bytes)")
    return data


def sample_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """``(key, suffix)`` of a member name by webdataset's rule, ``(None, None)`` for names it skips."""
    if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None, None
    match = _KEY_SUFFIX.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def image_suffix(suffixes) -> str | None:
    """The image suffix of a sample (the first of :data:`IMAGE_SUFFIXES` it has), compared lowercase."""
    lower = {s.lower(): s for s in suffixes}
    return next((lower[s] for s in IMAGE_SUFFIXES if s in lower), None)


def _shard_samples(shard: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """``(key, {suffix: member}, tar)`` for each sample of a shard, grouping consecutive members as webdataset does."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            key, members = None, {}
            for info in tar:
                name_key, suffix = sample_key(info.name) if info.isreg() else (None, None)
                if name_key is None:
                    continue
                if name_key != key and members:
                    yield key, members, tar
                    members = {}
                key = name_key
                if suffix.lower() in {s.lower() for s in members}:
                    raise ValueError(f"{shard}: sample {key!r} has two members with suffix {suffix!r}")
                members[suffix] = info
            if members:
                yield key, members, tar
    except tarfile.TarError as err:
        raise ValueError(f"{shard}: not a readable uncompressed tar shard ({err})") from err


# ---------------------------------------------------------------------- the JSON of a sample


@dataclass
class SampleAnnotations:
    """What a sample's JSON says (see the module docstring for the schema).

    Attributes:
        size: ``(width, height)``, or None when the JSON gives none.
        boxes: Float64 ``[M, 4]`` COCO ``[x, y, w, h]`` boxes of the non-crowd annotations.
        box_categories: Category id of each box.
        categories: Category ids of every annotation (crowd ones included) and of ``labels``.
        names: Category names the annotations give, by id.
    """

    size: tuple[int, int] | None
    boxes: np.ndarray
    box_categories: list[int] = field(default_factory=list)
    categories: list[int] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)


def _integer(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _size(obj: dict) -> tuple[int, int] | None:
    width, height = obj.get("width"), obj.get("height")
    if width is None and height is None:
        return None
    values = []
    for name, value in (("width", width), ("height", height)):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 1
        if not ok:
            raise ValueError(f"'{name}' must be a number >= 1 (or leave out both sizes), got {value!r}")
        values.append(int(value))
    return values[0], values[1]


def parse_annotations(data: bytes) -> SampleAnnotations:
    """Parses the ``json`` member of a sample.

    Raises:
        ValueError: Not JSON, not an object, or a field of the wrong type (the message says which).
    """
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"invalid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"the JSON must be an object, got {type(obj).__name__}")
    anns = obj.get("annotations") or []
    labels = obj.get("labels") or []
    if not isinstance(anns, list) or not isinstance(labels, list):
        raise ValueError("'annotations' and 'labels' must be lists")
    out = SampleAnnotations(size=_size(obj), boxes=np.zeros((0, 4)))
    boxes = []
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise ValueError(f"annotation #{k} must be an object")
        category = _integer(ann.get("category_id"), f"annotation #{k}: 'category_id'")
        name = ann.get("category_name")
        if name is not None:
            out.names[category] = str(name)
        out.categories.append(category)
        if _integer(ann.get("iscrowd", 0), f"annotation #{k}: 'iscrowd'"):
            continue  # a crowd region names a category but is no object box, as in COCO
        box = ann.get("bbox")
        try:
            values = [float(v) for v in box] if isinstance(box, list) else []
        except (TypeError, ValueError):
            values = []
        if len(values) != 4:
            raise ValueError(f"annotation #{k}: 'bbox' must be 4 numbers [x, y, w, h], got {box!r}")
        boxes.append(values)
        out.box_categories.append(category)
    out.categories += [_integer(v, "'labels' entries") for v in labels]
    out.boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return out


# ---------------------------------------------------------------------- records


class ShardRecords(Records):
    """:class:`Records` whose images are tar shard members.

    ``key(i)`` is the sample key (what a proposal store is keyed by); ``path(i)`` is the member path
    ``<shard.tar>#<key>.<suffix>`` that :func:`~objcrop.data.images.load_image` reads.

    Args:
        records: The table (keys, sizes, boxes, labels).
        shards: Every shard path.
        shard_index: Int ``[n]``: the shard of each sample.
        suffixes: Every image suffix that occurs (as in the member names).
        suffix_index: Int ``[n]``: the image suffix of each sample.
    """

    def __init__(self, records: Records, shards: Sequence[str], shard_index, suffixes: Sequence[str], suffix_index):
        vars(self).update(vars(records))  # the same arrays, not copies
        n = len(records)
        self.shards = tuple(str(s) for s in shards)
        self.shard_index = np.asarray(shard_index, np.int32).reshape(n)
        self.suffixes = tuple(str(s) for s in suffixes)
        self.suffix_index = np.asarray(suffix_index, np.int16).reshape(n)

    def shard(self, i: int) -> str:
        """The shard holding sample ``i``."""
        return self.shards[self.shard_index[i]]

    def path(self, i: int) -> str:
        """The path of image ``i`` inside its shard (what :func:`~objcrop.data.images.load_image` reads)."""
        return f"{self.shard(i)}{MEMBER_SEPARATOR}{self.key(i)}.{self.suffixes[self.suffix_index[i]]}"

    def subset(self, indices) -> ShardRecords:
        """The records at ``indices``, with their shards."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        base = super().subset(idx)
        return ShardRecords(base, self.shards, self.shard_index[idx], self.suffixes, self.suffix_index[idx])


def read_webdataset(images: str | os.PathLike) -> ShardRecords:
    """Reads the samples of webdataset tar shards (schema in the module docstring).

    Category ids become contiguous class indices in sorted-id order; a class is named by its
    ``category_name`` when an annotation gives one, else by its id. A sample without ``json`` has no
    boxes. Samples without an image, with invalid JSON, or whose size must be read from an unreadable
    image are skipped, counted and logged naming shard and key.

    Args:
        images: A folder of shards, a brace pattern, or one shard (see :func:`expand_shards`).

    Raises:
        ValueError: A key in two shards (both are named) or twice in one, a category with two names,
            an unreadable shard, or no usable sample at all.
    """
    spec = os.fspath(images)
    shards = expand_shards(spec)
    owner: dict[str, int] = {}
    keys, shard_index, suffixes, widths, heights, parsed = [], [], [], [], [], []
    suffix_codes: dict[str, int] = {}
    no_image = SkipCounter("samples without an image (skipped)", spec)
    bad_json = SkipCounter("samples with invalid JSON (skipped)", spec)
    unreadable = SkipCounter("samples whose image size cannot be read (skipped)", spec)
    for s, shard in enumerate(shards):
        for key, members, tar in _shard_samples(shard):
            if key in owner:
                where = f"twice in {shard}" if owner[key] == s else f"in both {shards[owner[key]]} and {shard}"
                raise ValueError(f"sample key {key!r} is {where}; keys must be unique across shards")
            owner[key] = s
            name = f"{shard}: {key}"
            suffix = image_suffix(members)
            if suffix is None:
                no_image.add(name, reason=f"members: {', '.join(sorted(members))}")
                continue
            json_member = next((m for sfx, m in members.items() if sfx.lower() == "json"), None)
            try:
                ann = parse_annotations(tar.extractfile(json_member).read()) if json_member else None
            except ValueError as err:
                bad_json.add(name, reason=str(err))
                continue
            size = ann.size if ann is not None else None
            if size is None:
                member = f"{shard}{MEMBER_SEPARATOR}{members[suffix].name}"
                try:
                    size = image_size_bytes(tar.extractfile(members[suffix]).read(), member)
                except ImageReadError as err:
                    unreadable.add(name, reason=err.reason)
                    continue
            keys.append(key)
            shard_index.append(s)
            suffixes.append(suffix_codes.setdefault(suffix, len(suffix_codes)))
            widths.append(size[0])
            heights.append(size[1])
            parsed.append(ann)
    for counter in (no_image, bad_json, unreadable):
        counter.log()
    if not keys:
        raise ValueError(f"{spec}: no usable sample in {len(shards)} shards (see the warnings above)")
    records = _build(spec, keys, widths, heights, parsed, [shards[s] for s in shard_index])
    return ShardRecords(records, shards, shard_index, tuple(suffix_codes), suffixes)


def _build(spec: str, keys, widths, heights, parsed: list[SampleAnnotations | None], owners) -> Records:
    names: dict[int, str] = {}
    boxes, box_cats, box_image, label_cats, label_image = [], [], [], [], []
    for i, ann in enumerate(parsed):
        if ann is None:
            continue
        for category, name in ann.names.items():
            if names.setdefault(category, name) != name:
                raise ValueError(
                    f"{owners[i]}: {keys[i]}: category {category} is named {name!r}, elsewhere {names[category]!r}"
                )
        boxes.append(ann.boxes)
        box_cats += ann.box_categories
        box_image += [i] * len(ann.boxes)
        label_cats += ann.categories
        label_image += [i] * len(ann.categories)
    ids = np.unique(np.asarray(box_cats + label_cats, np.int64))
    return build_records(
        root=spec if os.path.isdir(spec) else os.path.dirname(spec),
        paths=keys,
        widths=widths,
        heights=heights,
        boxes=xywh_to_xyxy(np.concatenate(boxes)) if boxes else np.zeros((0, 4), np.float32),
        box_labels=np.searchsorted(ids, np.asarray(box_cats, np.int64)),
        box_image=box_image,
        labels=np.searchsorted(ids, np.asarray(label_cats, np.int64)),
        label_image=label_image,
        class_names=[names.get(int(c), str(int(c))) for c in ids],
        source=spec,
    )


# ---------------------------------------------------------------------- writing shards


def _image_bytes(path: str) -> bytes:
    if os.path.isfile(path):
        return Path(path).read_bytes()
    member = split_member_path(path)
    if member is None:
        raise FileNotFoundError(errno.ENOENT, "image not found", path)
    return read_member(*member)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, _BytesReader(data))


class _BytesReader:
    """The ``read`` that ``TarFile.addfile`` needs, without copying ``data`` into a BytesIO."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        chunk = self._view if size < 0 else self._view[:size]
        self._view = self._view[len(chunk) :]
        return bytes(chunk)


def write_shards(
    records: Records, out_dir: str | os.PathLike, samples_per_shard: int = 1000, prefix: str = "shard"
) -> list[str]:
    """Writes a dataset as webdataset shards ``out_dir/<prefix>-000000.tar``, ... (the schema above).

    Each sample is the image file's bytes as they are plus a JSON with the record's size, boxes (as
    ``category_id``: class index, ``category_name``) and image-level ``labels``. The sample key is the
    record key without its extension (other dots of the file name become ``_``). Each shard is written
    atomically; existing shards are never overwritten.

    Returns:
        The shard paths.

    Raises:
        FileExistsError: A shard of that name already exists.
        ValueError: Two records give the same sample key, or ``samples_per_shard < 1``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    n = len(records)
    paths = [out / f"{prefix}-{s:06d}{SHARD_SUFFIX}" for s in range(-(-n // samples_per_shard))]
    existing = [p for p in paths if p.exists()]
    if existing:
        raise FileExistsError(errno.EEXIST, "shard exists; not overwriting it", str(existing[0]))
    names = {}
    for i in range(n):
        stem, ext = os.path.splitext(records.key(i))
        folder, base = os.path.split(stem)
        key = os.path.join(folder, base.replace(".", "_")).replace(os.sep, "/")
        if key in names:
            raise ValueError(f"records {records.key(names[key])!r} and {records.key(i)!r} both give sample key {key!r}")
        names[key] = i
    keys = list(names)
    for s, path in enumerate(paths):
        with atomic_open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(s * samples_per_shard, min(n, (s + 1) * samples_per_shard)):
                ext = os.path.splitext(records.key(i))[1].lstrip(".").lower() or "jpg"
                boxes = as_boxes(records.boxes_of(i)).astype(np.float64)
                boxes[:, 2:] -= boxes[:, :2]  # xyxy -> COCO xywh
                annotations = [
                    {"bbox": box, "category_id": c, "category_name": records.class_names[c]}
                    for box, c in zip(boxes.tolist(), records.box_labels_of(i).tolist(), strict=True)
                ]
                width, height = records.size(i)
                meta = {"width": width, "height": height, "annotations": annotations}
                meta["labels"] = records.labels_of(i).tolist()
                _add(tar, f"{keys[i]}.{ext}", _image_bytes(records.path(i)))
                _add(tar, f"{keys[i]}.json", json.dumps(meta).encode("utf-8"))
    return [str(p) for p in paths]
