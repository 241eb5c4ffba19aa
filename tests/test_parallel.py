"""objcrop.parallel: the one process pool (forkserver, initializer, bounded lazy imap)."""

import os
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from objcrop import parallel

_STATE: dict = {}


def _remember(value) -> None:
    _STATE["value"] = value


def _square_plus_state(x: int) -> tuple[int, int, int]:
    if x == 0:
        time.sleep(0.2)  # the first item finishes late: ordered results must still start with it
    return x, x * x + _STATE.get("value", 0), os.getpid()


def _die(x: int) -> int:
    if x == 3:
        os._exit(1)
    return x


def test_start_method_is_forkserver_where_available():
    import multiprocessing as mp

    expected = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    assert parallel.process_context().get_start_method() == expected


def test_ordered_results_follow_the_items_and_the_initializer_runs_in_every_worker():
    out = list(parallel.imap(_square_plus_state, range(20), 2, initializer=_remember, initargs=(100,), chunksize=3))
    assert [x for x, _, _ in out] == list(range(20))
    assert [y for _, y, _ in out] == [x * x + 100 for x in range(20)]
    assert os.getpid() not in {pid for _, _, pid in out}  # computed in worker processes
    assert "value" not in _STATE  # the initializer ran there, not here


def test_unordered_results_are_the_same_set():
    out = list(parallel.imap(_square_plus_state, range(15), 2, chunksize=2, ordered=False))
    assert sorted(y for _, y, _ in out) == sorted(x * x for x in range(15))


def test_items_are_read_lazily_a_bounded_number_ahead():
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    results = parallel.imap(_square_plus_state, items(), 1, chunksize=2, max_inflight=3)
    assert next(results)[0] == 0
    assert len(pulled) <= (3 + 1) * 2 + 1  # the chunks in flight plus the one topped up
    results.close()


def test_a_dead_worker_raises_broken_process_pool():
    with pytest.raises(BrokenProcessPool):
        list(parallel.imap(_die, range(8), 2))


@pytest.mark.parametrize(("kwargs", "message"), [({"workers": 0}, "workers"), ({"chunksize": 0}, "chunksize")])
def test_bad_arguments_are_named(kwargs, message):
    args = {"workers": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        next(parallel.imap(_square_plus_state, range(3), args.pop("workers"), **args))
