"""The proposal store: every image's proposals in a few memory-mapped numpy files.

Layout of a store folder (no pickle anywhere)::

    boxes.npy        float32 [N, 4]   xyxy pixels of the original image, image after image, best first
    scores.npy       float32 [N]
    offsets.npy      int64 [images + 1]; image i owns rows offsets[i]:offsets[i + 1]
    image_ids.npy    int64 [images]    the dataset's image ids
    sizes.npy        int32 [images, 2] (width, height) the boxes refer to
    key_blob.npy     uint8             utf-8 image keys (Records.key), concatenated
    key_offsets.npy  int64 [images + 1]
    meta.json        backend, params, created, counts; written last, it marks the store complete

Opening maps the arrays read-only, so DataLoader workers share the pages and a store bigger than
memory costs only what is touched.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from objcrop.io import write_json_atomic
from objcrop.proposals.gt import gt_proposals

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "STORE_FILES",
    "CorruptStoreError",
    "IncompleteStoreError",
    "StaleStoreError",
    "ProposalStore",
    "StoreKeys",
    "atomic_npy",
    "check_proposal_arrays",
    "save_npy",
    "write_json",
    "dataset_fingerprint",
    "mark_incomplete",
    "save_index",
    "save_meta",
]

FORMAT_VERSION = 1
META_FILE = "meta.json"
_ARRAYS = ("boxes", "scores", "offsets", "image_ids", "sizes", "key_blob", "key_offsets")
STORE_FILES = (*(f"{name}.npy" for name in _ARRAYS), META_FILE)
# dtype and number of dimensions of each array file: a store is mapped, never converted.
_LAYOUT = {
    "boxes": (np.float32, 2),
    "scores": (np.float32, 1),
    "offsets": (np.int64, 1),
    "image_ids": (np.int64, 1),
    "sizes": (np.int32, 2),
    "key_blob": (np.uint8, 1),
    "key_offsets": (np.int64, 1),
}
# Boxes may reach this far past their image's border (float rounding of other writers); anything
# further is a damaged store, not a rounding.
BOX_SLACK = 1.0
_CHECK_ROWS = 1 << 20  # boxes checked per block on open (16 MiB of boxes, 32 MiB as float64)


class StaleStoreError(ValueError):
    """The store was built for other images (count, keys or sizes differ from the dataset)."""


class CorruptStoreError(ValueError):
    """A store or chunk file that cannot be read or holds impossible values (the message names the file)."""


class IncompleteStoreError(ValueError):
    """The folder holds no finished store (no ``meta.json``): a build is running, was killed, or
    its chunks still need merging."""


@contextlib.contextmanager
def atomic_npy(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> Iterator[np.ndarray]:
    """Yields a writable memory map of a new ``.npy`` file that replaces ``path`` only when the
    block ends without error, so readers never see a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield out
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` to ``path`` atomically (temp file in the same folder, then rename)."""
    array = np.asarray(array)
    with atomic_npy(path, array.shape, array.dtype) as out:
        if array.size:
            out[...] = array


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically."""
    write_json_atomic(path, obj, indent=1, sort_keys=True)


def _encode_keys(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [k.encode("utf-8") for k in keys]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def dataset_fingerprint(keys: Sequence[str], widths, heights) -> str:
    """A short hash of the image keys and sizes: equal fingerprints mean the same images."""
    blob, offsets = _encode_keys(keys)
    h = hashlib.blake2b(digest_size=16)
    for arr in (blob, offsets, np.asarray(widths, np.int64), np.asarray(heights, np.int64)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def check_proposal_arrays(
    boxes, scores, offsets, sizes, where: str, suffix: str = ".npy", advice: str = "rebuild it with 'objcrop propose'"
) -> None:
    """Checks that proposal arrays are usable, block by block (memory maps stay cheap).

    ``offsets`` must partition ``boxes`` and ``scores`` over the ``len(sizes)`` images, sizes must
    be positive, and every box finite, ordered (``x2 >= x1``, ``y2 >= y1``) and inside its image
    (up to :data:`BOX_SLACK` pixels), every score finite.

    Args:
        boxes: ``[N, 4]`` xyxy boxes.
        scores: ``[N]`` scores.
        offsets: ``[images + 1]`` offsets.
        sizes: ``[images, 2]`` (width, height).
        where: Start of the message ("proposal store DIR", "corrupt chunk FILE").
        suffix: Appended to an array's name to name its file (".npy" in a store, "" in a chunk).
        advice: What the message tells the user to do.

    Raises:
        CorruptStoreError: The first problem found, naming ``where``, the array and the row.
    """
    n = len(sizes)

    def fail(name: str, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{where}: {name}{suffix} {what}; {advice}")

    if np.ndim(offsets) != 1 or len(offsets) != n + 1:
        raise fail("offsets", f"has {np.shape(offsets)} entries for {n} images (want {n + 1})")
    if np.shape(boxes)[1:] != (4,) or np.ndim(scores) != 1:
        raise fail("boxes", f"has shape {np.shape(boxes)} (want [N, 4]; scores [N], got {np.shape(scores)})")
    steps = np.diff(offsets)
    if offsets[0] != 0 or (steps < 0).any():
        i = int(np.argmax(steps < 0)) if offsets[0] == 0 else 0
        raise fail("offsets", f"are not increasing from 0 (image {i}: {offsets[i]} to {offsets[i + 1]})")
    if offsets[-1] != len(boxes) or len(scores) != len(boxes):
        raise fail("offsets", f"end at {offsets[-1]} for {len(boxes)} boxes and {len(scores)} scores")
    sizes = np.asarray(sizes)
    if sizes.shape != (n, 2) or (sizes < 1).any():
        i = int(np.argmax((sizes < 1).any(axis=1))) if sizes.shape == (n, 2) else 0
        raise fail("sizes", f"hold a size that is not positive (image {i}: {sizes[i].tolist()})")
    for start in range(0, len(boxes), _CHECK_ROWS):
        stop = min(start + _CHECK_ROWS, len(boxes))
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, stop - 1, side="right")) - 1
        rows_per_image = np.diff(np.clip(offsets[first : last + 2], start, stop))
        limits = sizes[first : last + 1].astype(np.float32) + np.float32(BOX_SLACK)
        b = np.asarray(boxes[start:stop])
        x1, y1, x2, y2 = b.T
        # In float32 like the boxes. NaN fails every comparison and an infinite coordinate fails a
        # limit, so only the scores need their own finiteness test.
        ok = (x1 >= -BOX_SLACK) & (y1 >= -BOX_SLACK) & (x2 >= x1) & (y2 >= y1)
        ok &= x2 <= np.repeat(limits[:, 0], rows_per_image)
        ok &= y2 <= np.repeat(limits[:, 1], rows_per_image)
        ok &= np.isfinite(scores[start:stop])
        if not ok.all():
            r = int(np.argmin(ok))
            row, image = start + r, int(np.searchsorted(offsets, start + r, side="right")) - 1
            box, score = np.asarray(b[r], np.float64), float(scores[start + r])
            (w, h) = (int(v) for v in sizes[image])
            if not (np.isfinite(box).all() and np.isfinite(score)):
                reason = "is not finite"
            elif box[2] < box[0] or box[3] < box[1]:
                reason = "has x2 < x1 or y2 < y1"
            else:
                reason = f"lies outside its {w}x{h} image"
            raise fail("boxes", f"row {row} (image {image}): box {box.tolist()} score {score} {reason}")


class StoreKeys(Sequence):
    """The image keys of a store, decoded on access from a utf-8 blob (a list of a million
    Python strings would be copied into every DataLoader worker)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self._blob = blob
        self._offsets = offsets

    @classmethod
    def from_strings(cls, keys: Sequence[str]) -> StoreKeys:
        """The keys ``keys`` encoded as UTF-8 bytes with offsets."""
        return cls(*_encode_keys(keys))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"key index {i} out of range for {len(self)} images")
        return self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")

    def __eq__(self, other) -> bool:
        if isinstance(other, StoreKeys):
            return np.array_equal(self._offsets, other._offsets) and np.array_equal(self._blob, other._blob)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        head = ", ".join(repr(k) for k in self[:3])
        return f"StoreKeys([{head}{', ...' if len(self) > 3 else ''}], {len(self)} keys)"


class ProposalStore:
    """Proposals of every image of a dataset, best first.

    Args:
        boxes: Float32 ``[N, 4]`` xyxy boxes in pixels of the original images.
        scores: Float32 ``[N]`` scores.
        offsets: Int64 ``[images + 1]``; image ``i`` owns ``boxes[offsets[i]:offsets[i + 1]]``.
        keys: Image keys (``Records.key(i)``), or a :class:`StoreKeys`.
        sizes: Int ``[images, 2]`` (width, height) of the images the boxes refer to.
        image_ids: Int64 ``[images]`` dataset ids; defaults to ``arange(images)``.
        meta: Backend, params, created, counts and anything else worth recording.
        folder: The folder the arrays are mapped from, if any.
    """

    def __init__(
        self,
        boxes,
        scores,
        offsets,
        keys: Sequence[str] | StoreKeys,
        sizes,
        image_ids=None,
        meta: dict | None = None,
        folder: str | os.PathLike | None = None,
    ) -> None:
        n = len(keys)
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        self.keys = keys if isinstance(keys, StoreKeys) else StoreKeys.from_strings(keys)
        self.sizes = np.asarray(sizes, dtype=np.int32).reshape(n, 2)
        self.image_ids = (
            np.arange(n, dtype=np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64).reshape(n)
        )
        self.meta = dict(meta or {})
        self.folder = None if folder is None else str(folder)
        self._check()

    def _check(self) -> None:
        where = f"proposal store {self.folder}" if self.folder else "proposal store"
        n = len(self.keys)
        if len(self.offsets) != n + 1:
            raise ValueError(f"{where}: offsets has {len(self.offsets)} entries for {n} images (want {n + 1})")
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"{where}: {len(self.boxes)} boxes but {len(self.scores)} scores")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.boxes) or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"{where}: offsets do not partition the {len(self.boxes)} boxes")

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        backend = self.meta.get("backend", "?")
        where = f", folder={self.folder!r}" if self.folder else ""
        return f"ProposalStore({len(self)} images, {len(self.boxes)} boxes, backend={backend!r}{where})"

    @property
    def widths(self) -> np.ndarray:
        """Int ``[N]`` image widths."""
        return self.sizes[:, 0]

    @property
    def heights(self) -> np.ndarray:
        """Int ``[N]`` image heights."""
        return self.sizes[:, 1]

    def key(self, i: int) -> str:
        """The key (image path as the dataset stores it) of image ``i``."""
        return self.keys[i]

    def size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of image ``i``."""
        return int(self.sizes[i, 0]), int(self.sizes[i, 1])

    def boxes_of(self, i: int) -> np.ndarray:
        """Float32 ``[k, 4]`` xyxy proposals of image ``i``, best first."""
        return self.boxes[self.offsets[i] : self.offsets[i + 1]]

    def scores_of(self, i: int) -> np.ndarray:
        """Float32 ``[k]`` scores of image ``i``'s proposals."""
        return self.scores[self.offsets[i] : self.offsets[i + 1]]

    def counts(self) -> np.ndarray:
        """Number of proposals of every image."""
        return np.diff(self.offsets)

    # ------------------------------------------------------------------ checks

    def check_matches(self, records) -> None:
        """Raises :class:`StaleStoreError` unless the store covers exactly ``records``' images
        (same count, same keys in the same order, same sizes)."""
        where = f"stale store {self.folder}" if self.folder else "stale store"
        if len(records) != len(self):
            raise StaleStoreError(
                f"{where}: store has {len(self)} images, dataset has {len(records)}; rebuild it with 'objcrop propose'"
            )
        blob, offsets = _encode_keys(records.keys())
        if not (np.array_equal(offsets, self.keys._offsets) and np.array_equal(blob, self.keys._blob)):
            differ = [i for i in range(len(self)) if self.keys[i] != records.key(i)]
            i = differ[0]
            raise StaleStoreError(
                f"{where}: {len(differ)} of {len(self)} image keys differ, first: index {i} "
                f"store {self.keys[i]!r} vs dataset {records.key(i)!r}"
            )
        bad = np.flatnonzero((self.widths != records.widths) | (self.heights != records.heights))
        if len(bad):
            i = int(bad[0])
            (sw, sh), (dw, dh) = self.size(i), records.size(i)
            raise StaleStoreError(
                f"{where}: {len(bad)} of {len(self)} images differ in size, first: {self.keys[i]} "
                f"store {sw}x{sh} vs dataset {dw}x{dh}"
            )

    # ------------------------------------------------------------------ io

    @classmethod
    def open(cls, folder: str | os.PathLike, records=None, check: bool = True) -> ProposalStore:
        """Maps a store folder read-only and checks its arrays (:func:`check_proposal_arrays`:
        one pass over the boxes, block by block).

        Args:
            folder: A folder written by :meth:`save` or ``objcrop propose``.
            records: When given, the dataset the store must match (see :meth:`check_matches`).
            check: Check the values of the boxes, scores, offsets and sizes (off only where the same
                store was checked already, as when a DataLoader worker unpickles it).

        Raises:
            FileNotFoundError: ``folder`` or one of its arrays does not exist.
            IncompleteStoreError: The folder has no ``meta.json`` (unfinished build).
            StaleStoreError: The store does not match ``records``.
            CorruptStoreError: A file cannot be read or holds impossible values (named).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"proposal store {folder} does not exist")
        meta_path = folder / META_FILE
        if not meta_path.exists():
            hint = " (its chunks await 'objcrop propose --merge')" if (folder / "shards").is_dir() else ""
            raise IncompleteStoreError(
                f"proposal store {folder} is incomplete: no {META_FILE}{hint}; "
                "re-run 'objcrop propose' with the same arguments to finish it"
            )
        meta = _read_meta(meta_path)
        arrays = {name: _map_array(folder, name) for name in _ARRAYS}
        _check_keys(folder, arrays["key_blob"], arrays["key_offsets"])
        n = len(arrays["key_offsets"]) - 1
        for name, shape in (("image_ids", (n,)), ("sizes", (n, 2))):
            if arrays[name].shape != shape:
                shape_now = arrays[name].shape
                raise CorruptStoreError(f"proposal store {folder}: {name}.npy has shape {shape_now}, want {shape}")
        if check:
            where = f"proposal store {folder}"
            check_proposal_arrays(arrays["boxes"], arrays["scores"], arrays["offsets"], arrays["sizes"], where)
        try:
            store = cls(
                boxes=arrays["boxes"],
                scores=arrays["scores"],
                offsets=arrays["offsets"],
                keys=StoreKeys(arrays["key_blob"], arrays["key_offsets"]),
                sizes=arrays["sizes"],
                image_ids=arrays["image_ids"],
                meta=meta,
                folder=folder,
            )
        except ValueError as err:
            raise CorruptStoreError(str(err)) from err
        if records is not None:
            store.check_matches(records)
        return store

    @classmethod
    def from_records(cls, records, topk: int | None = None) -> ProposalStore:
        """Ground-truth boxes as proposals, in memory: largest area first, score 1.0, so that a
        policy's top-k keeps the largest objects. See :func:`objcrop.proposals.gt.gt_proposals`."""
        boxes, scores, offsets = gt_proposals(records, topk)
        empty = int((np.diff(offsets) == 0).sum())
        meta = {
            "backend": "gt",
            "params": {"topk": topk},
            "counts": {"images": len(records), "boxes": len(boxes), "empty": empty, "failed": 0},
        }
        sizes = np.stack([records.widths, records.heights], axis=1)
        return cls(boxes, scores, offsets, records.keys(), sizes, records.image_ids, meta)

    def save(self, folder: str | os.PathLike, meta: dict | None = None) -> Path:
        """Writes the store to ``folder`` (created if needed), each file atomically and
        ``meta.json`` last. ``meta`` entries update the store's own."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        mark_incomplete(folder)
        save_npy(folder / "boxes.npy", self.boxes)
        save_npy(folder / "scores.npy", self.scores)
        save_index(folder, self.offsets, self.keys, self.sizes, self.image_ids)
        self.meta = save_meta(folder, {**self.meta, **(meta or {})}, self.offsets)
        return folder

    # A mapped store pickles as its folder: pickling the maps would copy every box into the
    # pickle (DataLoader workers under spawn, for example).
    def __getstate__(self) -> dict:
        if self.folder is not None:
            return {"folder": self.folder}
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        if set(state) == {"folder"}:
            state = ProposalStore.open(state["folder"], check=False).__dict__
        self.__dict__.update(state)


def _read_meta(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptStoreError(f"proposal store {path.parent}: {path.name} is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CorruptStoreError(f"proposal store {path.parent}: {path.name} holds no JSON object")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"proposal store {path.parent} has format {version!r}, newer than this objcrop")
    return meta


def _map_array(folder: Path, name: str) -> np.ndarray:
    """Maps ``folder/name.npy`` read-only, checking its dtype and number of dimensions."""
    path = folder / f"{name}.npy"
    if not path.exists():
        raise FileNotFoundError(f"proposal store {folder} lacks {path.name}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        where = f"proposal store {folder}: {path.name}"
        raise CorruptStoreError(f"{where} cannot be read ({err}); rebuild the store") from err
    dtype, ndim = _LAYOUT[name]
    if array.dtype != dtype or array.ndim != ndim:
        raise CorruptStoreError(
            f"proposal store {folder}: {path.name} holds {array.dtype} with {array.ndim} dimensions, "
            f"want {np.dtype(dtype)} with {ndim}"
        )
    return array


def _check_keys(folder: Path, blob: np.ndarray, offsets: np.ndarray) -> None:
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any():
        raise CorruptStoreError(f"proposal store {folder}: key_offsets.npy does not partition key_blob.npy")


def mark_incomplete(folder: str | os.PathLike) -> None:
    """Removes ``meta.json`` before a store's files are (re)written, so that a crash leaves a
    folder that opens as incomplete rather than one mixing old and new arrays."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(Path(folder) / META_FILE)


def save_index(folder: str | os.PathLike, offsets, keys, sizes, image_ids) -> None:
    """Writes every store array except boxes and scores (offsets, keys, sizes, image ids)."""
    folder = Path(folder)
    keys = keys if isinstance(keys, StoreKeys) else StoreKeys.from_strings(keys)
    save_npy(folder / "offsets.npy", np.asarray(offsets, np.int64))
    save_npy(folder / "image_ids.npy", np.asarray(image_ids, np.int64))
    save_npy(folder / "sizes.npy", np.asarray(sizes, np.int32).reshape(-1, 2))
    save_npy(folder / "key_blob.npy", keys._blob)
    save_npy(folder / "key_offsets.npy", keys._offsets)


def save_meta(folder: str | os.PathLike, meta: dict, offsets) -> dict:
    """Completes ``meta`` (backend, params, created, counts, format version) and writes it as
    ``meta.json``, the marker of a complete store. Returns the written dict."""
    offsets = np.asarray(offsets)
    counts = np.diff(offsets)
    out = dict(meta)
    out.setdefault("backend", "unknown")
    out.setdefault("params", {})
    out.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out["counts"] = {
        "failed": 0,
        **out.get("counts", {}),
        "images": len(counts),
        "boxes": int(offsets[-1]),
        "empty": int((counts == 0).sum()),
    }
    out["format_version"] = FORMAT_VERSION
    write_json(Path(folder) / META_FILE, out)
    return out
