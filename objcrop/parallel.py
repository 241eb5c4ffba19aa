"""One process pool for objcrop's parallel loops (proposals, BING training, synthetic scenes).

Workers start with ``forkserver`` (``spawn`` where the platform has none): a plain ``fork`` of a process that
may hold threads (OpenCV, torch, numba, tqdm) can deadlock the child. The module of the worker function is
imported once by the fork server, so each worker forks from a process that already paid for the imports.
Everything a worker gets (the function, the initializer's arguments, the items) must therefore pickle.

:func:`imap` keeps a bounded number of chunks in flight, so a generator of a million tasks is read as the work
goes and results arrive as they finish, ready for a tqdm bar::

    for result in tqdm(imap(work, tasks, workers=4, initializer=setup, initargs=(model,)), total=len(tasks)):
        ...
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

__all__ = ["imap", "process_context"]


def process_context(preload: Sequence[str] = ()) -> mp.context.BaseContext:
    """The start method of objcrop's worker processes: ``forkserver`` (importing ``preload`` once), else ``spawn``."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    modules = [m for m in preload if m != "__main__"]  # the main module reaches workers by its path, not by name
    if modules:
        ctx.set_forkserver_preload(modules)  # only the first call before the server starts counts
    return ctx


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    # N workers already use the N cores: keep the libraries inside each worker single-threaded.
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


def _apply(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(item) for item in chunk]


def imap(
    fn: Callable[[Any], Any],
    items: Iterable,
    workers: int,
    *,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    chunksize: int = 1,
    ordered: bool = True,
    max_inflight: int | None = None,
) -> Iterator:
    """Yields ``fn(item)`` for every item, computed in ``workers`` processes.

    Args:
        fn: A module-level function of one item (it is pickled by name).
        items: Any iterable; it is read lazily, ``max_inflight`` chunks ahead of the results.
        workers: Worker processes, at least 1 (a caller runs its own loop for in-process work, where an
            initializer's side effects such as single-threading must not touch the main process).
        initializer: Called once in each worker with ``initargs`` (e.g. to keep a model in a module global).
        initargs: Arguments of ``initializer``, pickled once per worker.
        chunksize: Items sent to a worker at a time.
        ordered: Results in the order of ``items``; ``False``: in the order they finish (a slow item then
            does not hold back the others).
        max_inflight: Chunks submitted but not yet yielded (default ``4 * workers``).

    Raises:
        ValueError: ``workers``, ``chunksize`` or ``max_inflight`` below 1.
        concurrent.futures.process.BrokenProcessPool: A worker died (a crash in native code, or killed).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    limit = 4 * workers if max_inflight is None else max_inflight
    if limit < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    source = iter(items)
    chunks = iter(lambda: list(itertools.islice(source, chunksize)), [])
    pool = ProcessPoolExecutor(
        workers,
        mp_context=process_context([fn.__module__]),
        initializer=_start_worker,
        initargs=(initializer, initargs),
    )
    try:
        inflight: deque[Future] = deque(pool.submit(_apply, fn, chunk) for chunk in itertools.islice(chunks, limit))
        while inflight:
            if ordered:
                finished = [inflight.popleft()]
            else:
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                finished = [f for f in inflight if f in done]  # in submission order, for reproducible ties
                inflight = deque(f for f in inflight if f not in done)
            for future in finished:
                yield from future.result()
                inflight.extend(pool.submit(_apply, fn, chunk) for chunk in itertools.islice(chunks, 1))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
