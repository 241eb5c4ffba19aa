"""Builds a proposal store by running a proposer over every image of a dataset.

The work is cut into chunks of ``shard_size`` consecutive images. Each finished chunk is written
atomically to ``out_dir/shards/<start>-<end>.npz``, so a killed build loses at most the chunks in
flight and a re-run with the same arguments continues where it stopped. Several machines can
share the chunks (``shard=(i, n)`` takes chunks ``c`` with ``c % n == i``); :func:`merge_store`
then joins them into the store. A single-machine build merges by itself at the end.

What a build may replace or delete in ``out_dir`` (only what objcrop wrote, by a list of names) and
the lock that keeps two runs apart are in :mod:`objcrop.proposals.ownership`. Chunks and stores are
checked when read (:func:`~objcrop.proposals.store.check_proposal_arrays`): a damaged file is named.

A proposer is any callable ``proposer(image HxWx3 uint8 RGB) -> (boxes float32 [n, 4] xyxy,
scores float32 [n])``, best first. With ``workers > 1`` it is pickled into worker processes
(``forkserver``), so it must be picklable: a backend holding an unpicklable handle (an OpenCV
object, a model) should create it on first call and leave it out of its pickled state. As with
any ``spawn``/``forkserver`` pool, a script that calls :func:`build_store` with workers needs the
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from objcrop import boxes as B
from objcrop import parallel
from objcrop.data.images import ImageReadError, load_image
from objcrop.io import write_bytes_atomic
from objcrop.proposals.ownership import (
    BUILD_FILE,
    SHARDS_DIR,
    claim_folder,
    folder_lock,
    read_objcrop_json,
    remove_files,
    remove_store_files,
)
from objcrop.proposals.store import (
    FORMAT_VERSION,
    META_FILE,
    CorruptStoreError,
    ProposalStore,
    StaleStoreError,
    atomic_npy,
    check_proposal_arrays,
    dataset_fingerprint,
    mark_incomplete,
    save_index,
    save_meta,
    write_json,
)

__all__ = [
    "Proposer",
    "BuildResult",
    "BuildAbortedError",
    "build_store",
    "merge_store",
    "write_gt_store",
    "propose_image",
    "finalize_proposals",
    "decode_for_proposals",
    "parse_shard",
    "shard_from_env",
]

log = logging.getLogger(__name__)

Proposer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

_BATCH = 4  # images per task sent to a worker
# When the first this-many images of a run all fail, the setup is wrong (wrong image folder, a
# proposer that always raises) and the build stops instead of writing an empty store.
ABORT_AFTER_FAILURES = 32


class BuildAbortedError(ValueError):
    """Every image of the first :data:`ABORT_AFTER_FAILURES` failed."""


@dataclass
class BuildResult:
    """What a :func:`build_store` run did.

    Attributes:
        images: Images proposed by this run.
        seconds: Wall time of the proposing.
        img_per_s: ``images / seconds``.
        failed: ``(key, reason)`` of every image of this machine's chunks that could not be
            proposed (they have zero proposals), including chunks written by earlier runs.
        skipped: Images of chunks that earlier runs had already written.
        merged: True when the final store was written (single-machine builds).
        out_dir: The store folder.
    """

    images: int
    seconds: float
    img_per_s: float
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0
    merged: bool = False
    out_dir: str = ""


def parse_shard(text: str) -> tuple[int, int]:
    """Parses ``"i/n"`` (this machine does chunks ``c % n == i``) into ``(i, n)``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like 'i/n' (e.g. 0/4), got {text!r}") from None
    return _check_shard((i, n))


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is invalid: need 0 <= i < n")
    return i, n


def _env_int(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def shard_from_env(environ=None) -> tuple[tuple[int, int], str] | None:
    """The shard a cluster launcher gives this process, and which variables said so.

    A SLURM job array (``SLURM_ARRAY_TASK_ID`` of ``SLURM_ARRAY_TASK_COUNT`` tasks, counted from
    ``SLURM_ARRAY_TASK_MIN`` when set, as in ``--array=1-8``) comes first, then torchrun and other
    launchers (``RANK`` of ``WORLD_SIZE``).

    Returns:
        ``((i, n), source)``, or None when neither is set.

    Raises:
        ValueError: The variables are not integers or give no valid shard (named).
    """
    environ = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        task, count = _env_int(environ, "SLURM_ARRAY_TASK_ID"), _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
        low = _env_int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
        source = "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT"
        shard = (task - low, count)
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        shard, source = (_env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")), "RANK of WORLD_SIZE"
    else:
        return None
    try:
        return _check_shard(shard), source
    except ValueError as err:
        # An array with a step (--array=0-15:2) numbers its tasks with gaps: say what to do.
        raise ValueError(f"{err} (from {source}); pass --shard i/n explicitly") from None


# ---------------------------------------------------------------------- one image


def finalize_proposals(
    boxes,
    scores,
    width: int,
    height: int,
    topk: int | None,
    scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Brings a proposer's output into store form: scaled by ``scale`` (decoded pixels to
    original pixels), clipped to ``width x height``, unusable boxes dropped, the first ``topk``
    kept. The proposer's order (best first) is kept."""
    boxes = B.as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"proposer returned {len(boxes)} boxes but {len(scores)} scores")
    sx, sy = scale
    if (sx, sy) != (1.0, 1.0):
        boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
    boxes, keep = B.sanitize(boxes, width, height)
    return boxes[:topk], scores[keep][:topk]


def decode_for_proposals(
    path: str, width: int, height: int, max_side: int | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """Decodes an image for a proposer, optionally reduced so that its longer side is ``max_side``
    (JPEG draft decoding, then a resize).

    Returns:
        The HxWx3 uint8 RGB pixels and the ``(sx, sy)`` factors from their coordinates to the
        original ``width x height`` image.

    Raises:
        FileNotFoundError, ImageReadError: The image cannot be read.
        ValueError: The decoded image does not have the dataset's size or aspect ratio.
    """
    target = None
    if max_side is not None and max(width, height) > max_side:
        # Rounded down: PIL's draft picks scale 1/s only if size // s >= the request in both axes.
        long = max(width, height)
        target = (max(1, width * max_side // long), max(1, height * max_side // long))
    img = load_image(path, draft_size=target)
    dw, dh = img.size
    if target is None and (dw, dh) != (width, height):
        raise ValueError(f"decoded size {dw}x{dh} differs from the dataset's {width}x{height}")
    if target is not None:
        if abs(dh - height * dw / width) > 1.0 or dw < target[0] - 1:
            raise ValueError(f"decoded size {dw}x{dh} does not match the dataset's {width}x{height}")
        if (dw, dh) != target:
            img = img.resize(target, Image.Resampling.BILINEAR)
        dw, dh = target
    return np.asarray(img), (width / dw, height / dh)


def propose_image(
    proposer: Proposer,
    path: str,
    width: int,
    height: int,
    topk: int | None = None,
    decode_max_side: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Decodes one image, runs the proposer and finalizes its boxes (original pixels).

    Returns:
        ``(boxes, scores, None)``, or empty arrays and the reason when the image or the proposer
        failed; one bad image must not end a long build.
    """
    empty = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    try:
        image, scale = decode_for_proposals(path, width, height, decode_max_side)
    except FileNotFoundError:
        return (*empty, "image file not found")
    except ImageReadError as err:
        return (*empty, err.reason)
    except (OSError, ValueError) as err:
        return (*empty, str(err))
    try:
        boxes, scores = proposer(image)
        boxes, scores = finalize_proposals(boxes, scores, width, height, topk, scale)
    except Exception as err:  # a backend crashing on one odd image is logged and counted, see above
        return (*empty, f"proposer failed: {type(err).__name__}: {err}")
    return boxes, scores, None


# ---------------------------------------------------------------------- chunks


def _chunk_bounds(c: int, num_images: int, shard_size: int) -> tuple[int, int]:
    return c * shard_size, min((c + 1) * shard_size, num_images)


def _chunk_name(start: int, end: int) -> str:
    return f"{start:09d}-{end:09d}.npz"


def _write_chunk(path: Path, start: int, results: list[tuple[np.ndarray, np.ndarray, str | None]]) -> None:
    counts = [len(b) for b, _, _ in results]
    offsets = np.zeros(len(results) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    failed = [[start + j, reason] for j, (_, _, reason) in enumerate(results) if reason is not None]
    buf = io.BytesIO()
    np.savez(
        buf,
        boxes=np.concatenate([b for b, _, _ in results]).astype(np.float32).reshape(-1, 4),
        scores=np.concatenate([s for _, s, _ in results]).astype(np.float32),
        offsets=offsets,
        failed=np.frombuffer(json.dumps(failed).encode("utf-8"), dtype=np.uint8),
    )
    write_bytes_atomic(path, buf.getvalue())


# What np.load and the zip members of a damaged .npz raise (a zero-byte file: EOFError; a cut or
# overwritten one: BadZipFile, zlib.error, ValueError).
_CHUNK_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def _corrupt(path: Path, what: str) -> CorruptStoreError:
    return CorruptStoreError(f"corrupt chunk {path}: {what}; delete it and re-run 'objcrop propose' to recompute it")


def _read_chunk(path: Path, start: int, end: int, names: tuple[str, ...], sizes=None) -> dict:
    """Loads and checks the arrays ``names`` of a chunk file (only those: npz members load lazily).

    With ``"boxes"`` in ``names``, ``sizes`` (the ``[end - start, 2]`` image sizes) are needed to
    check the boxes; ``"failed"`` comes back parsed as ``[(image index, reason), ...]``.

    Raises:
        CorruptStoreError: The file cannot be read or its arrays are inconsistent (named).
    """
    try:
        with np.load(path, allow_pickle=False) as chunk:
            arrays = {name: chunk[name] for name in ("offsets", *names)}
        offsets = arrays["offsets"]
        if offsets.ndim != 1 or len(offsets) != end - start + 1:
            raise _corrupt(path, f"holds {len(offsets) - 1} images, expected {end - start}")
        if "failed" in names:
            failed = json.loads(arrays["failed"].tobytes().decode("utf-8"))
            arrays["failed"] = [(int(i), str(r)) for i, r in failed]
            if not all(start <= i < end for i, _ in arrays["failed"]):
                raise _corrupt(path, f"lists failed images outside {start}-{end - 1}")
    except CorruptStoreError:
        raise
    except (*_CHUNK_READ_ERRORS, TypeError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from err
    if "boxes" in names:
        advice = "delete it and re-run 'objcrop propose' to recompute it"
        check_proposal_arrays(arrays["boxes"], arrays["scores"], offsets, sizes, f"corrupt chunk {path}", "", advice)
    return arrays


# ---------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(proposer: Proposer, topk: int | None, decode_max_side: int | None) -> None:
    _WORKER.update(proposer=proposer, topk=topk, decode_max_side=decode_max_side)


def _work(task: tuple[int, str, int, int]) -> tuple[int, np.ndarray, np.ndarray, str | None]:
    i, path, width, height = task
    return (i, *propose_image(_WORKER["proposer"], path, width, height, _WORKER["topk"], _WORKER["decode_max_side"]))


def _run(
    proposer: Proposer,
    tasks: Iterator[tuple[int, str, int, int]],
    workers: int,
    topk: int | None,
    max_side: int | None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, str | None]]:
    """Yields ``(index, boxes, scores, reason)`` for every task, in completion order."""
    if workers <= 1:
        for i, path, width, height in tasks:
            yield (i, *propose_image(proposer, path, width, height, topk, max_side))
        return
    # A few small batches in flight per worker: results arrive nearly in order (chunks complete
    # one after the other) and a crashed worker raises BrokenProcessPool instead of hanging.
    try:
        yield from parallel.imap(
            _work,
            tasks,
            workers,
            initializer=_init_worker,
            initargs=(proposer, topk, max_side),
            chunksize=_BATCH,
            ordered=False,
        )
    except BrokenProcessPool as err:
        raise BuildAbortedError(
            "a worker process died (a crash inside the backend?); finished chunks are kept: "
            "re-run to resume, or use one worker to see the error"
        ) from err


# ---------------------------------------------------------------------- build and merge


def _build_config(records, meta: dict, topk: int | None, decode_max_side: int | None, shard_size: int | None) -> dict:
    config = {
        "format_version": FORMAT_VERSION,
        "backend": meta.get("backend", "unknown"),
        "params": meta.get("params", {}),
        "topk": topk,
        "decode_max_side": decode_max_side,
        "shard_size": shard_size,
        "images": len(records),
        "dataset": dataset_fingerprint(records.keys(), records.widths, records.heights),
    }
    return json.loads(json.dumps(config))  # tuples -> lists, as they come back from disk


def _config_difference(old: dict, new: dict) -> str:
    diff = [f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(diff)


def _chunk_names(config: dict) -> list[str]:
    """File names of every chunk of the build ``config``."""
    n, size = int(config["images"]), int(config["shard_size"])
    return [_chunk_name(*_chunk_bounds(c, n, size)) for c in range(-(-n // size))]


def _claim_store(out: Path, config: dict, overwrite: bool) -> bool:
    """Checks the finished store in ``out`` against ``config``: True when it is this very build;
    a different one is refused, or removed with ``overwrite``."""
    if not (out / META_FILE).exists():
        return False
    old = read_objcrop_json(out / META_FILE, ("format_version",))
    if old is None:
        raise ValueError(f"{out / META_FILE} is not the meta.json of an objcrop proposal store; choose another --out")
    if old.get("build") == config:
        return True
    if not overwrite:
        raise ValueError(
            f"{out} already holds a different proposal store ({_config_difference(old.get('build') or {}, config)}); "
            "choose another output folder, or pass --overwrite to replace it"
        )
    log.warning("%s: replacing the %s proposal store (--overwrite)", out, old.get("backend", "unknown"))
    remove_store_files(out)
    return False


def _claim_shards(out: Path, config: dict, overwrite: bool) -> None:
    """Makes ``out/shards`` hold chunks of ``config``'s build: resumes the same build; another
    build's chunks are refused, or removed with ``overwrite``."""
    shards = out / SHARDS_DIR
    build_path = shards / BUILD_FILE
    if shards.is_dir():
        old = read_objcrop_json(build_path, ("format_version", "dataset", "images", "shard_size"))
        if old is None and os.listdir(shards):
            raise ValueError(
                f"{shards} was not made by objcrop (no valid {BUILD_FILE}); move it away or choose another --out"
            )
        if old is not None and old != config:
            if not overwrite:
                raise ValueError(
                    f"{shards} holds chunks of a different build ({_config_difference(old, config)}); "
                    "use the same arguments to resume, or pass --overwrite to start over"
                )
            log.warning("%s: removing the chunks of a different build (--overwrite)", shards)
            remove_files(shards, [*_chunk_names(old), BUILD_FILE])
    shards.mkdir(exist_ok=True)
    if not build_path.exists():
        write_json(build_path, config)


def _check_done_chunks(shards: Path, chunks: list[tuple[int, int]]) -> None:
    """Reads the offsets of finished chunks before a resumed build computes anything, so that a
    damaged one is named now rather than after the rest of the work."""
    for lo, hi in chunks:
        _read_chunk(shards / _chunk_name(lo, hi), lo, hi, ())


def build_store(
    records,
    proposer: Proposer,
    out_dir: str | os.PathLike,
    workers: int = 1,
    topk: int | None = 1000,
    shard: tuple[int, int] = (0, 1),
    shard_size: int = 256,
    decode_max_side: int | None = None,
    meta: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildResult:
    """Runs ``proposer`` over the images of ``records`` and writes the proposal store.

    Args:
        records: The dataset (:class:`objcrop.data.records.Records`).
        proposer: ``image -> (boxes, scores)``, best first; picklable when ``workers > 1``.
        out_dir: Store folder; its ``shards/`` sub-folder holds the finished chunks.
        workers: Processes running the proposer (1 runs it in this process).
        topk: Proposals kept per image (all when ``None``).
        shard: ``(i, n)``: this machine does chunks ``c % n == i`` and, when ``n > 1``, leaves
            the merge to :func:`merge_store`.
        shard_size: Images per chunk.
        decode_max_side: Decode images with their longer side reduced to this many pixels; the
            stored boxes are still in original pixels.
        meta: ``{"backend": name, "params": {...}}`` recorded in the store (JSON-serializable).
        progress: Show a tqdm bar.
        overwrite: Replace a different store (or another build's chunks) that objcrop wrote in
            ``out_dir``; without it they are refused. Files objcrop did not write are always refused.

    Returns:
        A :class:`BuildResult`.

    Raises:
        ValueError: ``out_dir`` holds another build or files objcrop did not write, a chunk is
            corrupt, :class:`~objcrop.proposals.ownership.FolderLockedError` when another process
            is writing it, or :class:`BuildAbortedError` when every one of the first images failed.
    """
    index, count = _check_shard(shard)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    meta = dict(meta or {"backend": type(proposer).__name__, "params": {}})
    config = _build_config(records, meta, topk, decode_max_side, shard_size)
    out = claim_folder(out_dir)
    with folder_lock(out, (index, count)):
        if _claim_store(out, config, overwrite):
            log.info("%s is already complete", out)
            store = ProposalStore.open(out, records)
            failed = [(str(k), str(r)) for k, r in store.meta.get("failed", [])]
            return BuildResult(0, 0.0, 0.0, failed, skipped=len(records), merged=True, out_dir=str(out))
        _claim_shards(out, config, overwrite)
        result = _build_chunks(
            records, proposer, out, (index, count), shard_size, workers, topk, decode_max_side, meta, progress
        )
        if count == 1:
            _merge(out, records, keep_shards=False)
            result.merged = True
    return result


def _build_chunks(
    records,
    proposer: Proposer,
    out: Path,
    shard: tuple[int, int],
    shard_size: int,
    workers: int,
    topk: int | None,
    decode_max_side: int | None,
    meta: dict,
    progress: bool,
) -> BuildResult:
    """Computes the missing chunks of this machine's shard into ``out/shards`` (see :func:`build_store`)."""
    index, count = shard
    shards = out / SHARDS_DIR
    n = len(records)
    mine = [c for c in range(-(-n // shard_size)) if c % count == index]
    todo = [c for c in mine if not (shards / _chunk_name(*_chunk_bounds(c, n, shard_size))).exists()]
    _check_done_chunks(shards, [_chunk_bounds(c, n, shard_size) for c in sorted(set(mine) - set(todo))])
    num_tasks = sum(hi - lo for c in todo for lo, hi in [_chunk_bounds(c, n, shard_size)])
    tasks = ((i, records.path(i), *records.size(i)) for c in todo for i in range(*_chunk_bounds(c, n, shard_size)))
    skipped = sum(hi - lo for c in set(mine) - set(todo) for lo, hi in [_chunk_bounds(c, n, shard_size)])
    if skipped:
        log.info("resuming: %d images in %d chunks already done", skipped, len(mine) - len(todo))

    pending: dict[int, dict[int, tuple]] = {c: {} for c in todo}
    done = failures = 0
    start_time = time.perf_counter()
    bar = tqdm(total=num_tasks, unit="img", desc=f"propose {meta.get('backend', '')}".strip(), disable=not progress)
    with bar:
        for i, boxes, scores, reason in _run(proposer, tasks, workers, topk, decode_max_side):
            done += 1
            if reason is not None:
                failures += 1
                log.debug("%s: %s", records.key(i), reason)
                if failures == done == ABORT_AFTER_FAILURES:
                    raise BuildAbortedError(
                        f"the first {done} images all failed (e.g. {records.path(i)}: {reason}); "
                        "check the image folder and the backend"
                    )
            c = i // shard_size
            pending[c][i] = (boxes, scores, reason)
            lo, hi = _chunk_bounds(c, n, shard_size)
            if len(pending[c]) == hi - lo:
                _write_chunk(shards / _chunk_name(lo, hi), lo, [pending[c][j] for j in range(lo, hi)])
                del pending[c]
            bar.update(1)
            bar.set_postfix(failed=failures, refresh=False)
    seconds = time.perf_counter() - start_time

    failed = []
    for c in mine:
        lo, hi = _chunk_bounds(c, n, shard_size)
        chunk = _read_chunk(shards / _chunk_name(lo, hi), lo, hi, ("failed",))
        failed += [(records.key(i), reason) for i, reason in chunk["failed"]]
    result = BuildResult(
        images=done,
        seconds=seconds,
        img_per_s=done / seconds if seconds > 0 else 0.0,
        failed=failed,
        skipped=skipped,
        out_dir=str(out),
    )
    log.info(
        "proposed %d images in %.1f s (%.1f img/s), %d failed in this machine's part",
        done,
        seconds,
        result.img_per_s,
        len(failed),
    )
    return result


def merge_store(out_dir: str | os.PathLike, records, keep_shards: bool = False) -> ProposalStore:
    """Joins the chunks in ``out_dir/shards`` into the store in ``out_dir``.

    Args:
        out_dir: The folder every machine's chunks were gathered in.
        records: The dataset the chunks were built for.
        keep_shards: Keep the chunk files after the store is complete (by default they are
            deleted, as they hold the same boxes again; only the chunk files of this build and
            its ``build.json`` are deleted, anything else in ``shards/`` is kept).

    Returns:
        The opened store.

    Raises:
        FileNotFoundError: ``out_dir`` has no chunks.
        StaleStoreError: The chunks were built for another dataset.
        ValueError: Chunks are missing (all are named) or corrupt, or another process is writing
            the folder (:class:`~objcrop.proposals.ownership.FolderLockedError`).
    """
    out = Path(out_dir)
    build_path = out / SHARDS_DIR / BUILD_FILE
    if not build_path.exists():
        raise FileNotFoundError(f"{out} holds no proposal chunks ({build_path} is missing); run 'objcrop propose'")
    claim_folder(out)
    with folder_lock(out):
        return _merge(out, records, keep_shards)


def _merge(out: Path, records, keep_shards: bool) -> ProposalStore:
    shards = out / SHARDS_DIR
    config = read_objcrop_json(shards / BUILD_FILE, ("format_version", "dataset", "images", "shard_size"))
    if config is None:
        raise ValueError(f"{shards / BUILD_FILE} is not a build description written by objcrop propose")
    n, shard_size = config["images"], config["shard_size"]
    if n != len(records) or config["dataset"] != dataset_fingerprint(records.keys(), records.widths, records.heights):
        raise StaleStoreError(f"the chunks in {shards} were built for other images than this dataset's {len(records)}")

    chunks = [_chunk_bounds(c, n, shard_size) for c in range(-(-n // shard_size))]
    missing = [(c, lo, hi) for c, (lo, hi) in enumerate(chunks) if not (shards / _chunk_name(lo, hi)).exists()]
    if missing:
        names = ", ".join(f"{_chunk_name(lo, hi)} (chunk {c}, images {lo}-{hi - 1})" for c, lo, hi in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(
            f"cannot merge {out}: {len(missing)} of {len(chunks)} chunks missing: {names}{more}. "
            "Chunk c is made by the machine run with --shard c%n/n; run those parts, then merge again"
        )

    sizes = np.stack([records.widths, records.heights], 1)
    counts = np.zeros(n, dtype=np.int64)
    failed = []
    for lo, hi in chunks:
        chunk = _read_chunk(shards / _chunk_name(lo, hi), lo, hi, ("failed",))
        counts[lo:hi] = np.diff(chunk["offsets"])
        failed += [(records.key(i), reason) for i, reason in chunk["failed"]]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    mark_incomplete(out)
    total = int(offsets[-1])
    with (
        atomic_npy(out / "boxes.npy", (total, 4), np.float32) as boxes,
        atomic_npy(out / "scores.npy", (total,), np.float32) as scores,
    ):
        for lo, hi in chunks:
            chunk = _read_chunk(shards / _chunk_name(lo, hi), lo, hi, ("boxes", "scores"), sizes[lo:hi])
            if not np.array_equal(np.diff(chunk["offsets"]), counts[lo:hi]):
                raise ValueError(f"chunk {_chunk_name(lo, hi)} changed while merging; merge again")
            boxes[offsets[lo] : offsets[hi]] = chunk["boxes"]
            scores[offsets[lo] : offsets[hi]] = chunk["scores"]
    save_index(out, offsets, records.keys(), sizes, records.image_ids)
    meta = {
        "backend": config["backend"],
        "params": config["params"],
        "build": config,
        "counts": {"failed": len(failed)},
        "failed": [list(f) for f in failed],
    }
    save_meta(out, meta, offsets)
    if not keep_shards:
        _remove_chunks(shards, config)
    log.info("merged %d chunks into %s: %d images, %d boxes, %d failed", len(chunks), out, n, total, len(failed))
    return ProposalStore.open(out, records)


def _remove_chunks(shards: Path, config: dict) -> None:
    """Deletes the chunk files of the build ``config`` and its build.json, then ``shards/`` if
    that left it empty; anything else in it is kept and named."""
    remove_files(shards, [*_chunk_names(config), BUILD_FILE])
    left = sorted(os.listdir(shards))
    if left:
        log.warning("%s: kept %d files objcrop did not write (%s)", shards, len(left), ", ".join(left[:5]))
    else:
        shards.rmdir()


def write_gt_store(records, out_dir: str | os.PathLike, topk: int | None = None, overwrite: bool = False) -> bool:
    """Writes the ground-truth boxes of ``records`` as a store (see
    :meth:`ProposalStore.from_records`), with the same folder rules as :func:`build_store`.

    Returns:
        False when ``out_dir`` already held this very store (nothing was written), else True.

    Raises:
        ValueError: ``out_dir`` holds a different store (without ``overwrite``), files objcrop did
            not write, or another process is writing it.
    """
    config = _build_config(records, {"backend": "gt", "params": {"topk": topk}}, topk, None, None)
    out = claim_folder(out_dir)
    with folder_lock(out):
        if _claim_store(out, config, overwrite):
            ProposalStore.open(out, records)
            return False
        ProposalStore.from_records(records, topk).save(out, meta={"build": config})
    return True
