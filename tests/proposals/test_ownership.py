import json
import os
import socket
import subprocess
import sys

import pytest

from objcrop.proposals.ownership import (
    LOCK_PREFIX,
    MARKER_FILE,
    FolderLockedError,
    claim_folder,
    folder_lock,
    remove_files,
)


def test_a_new_folder_is_created_and_marked(tmp_path):
    out = claim_folder(tmp_path / "a" / "store")
    assert out.is_dir() and (out / MARKER_FILE).is_file()


def test_a_folder_with_unrelated_files_is_marked_and_the_files_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    claim_folder(tmp_path)
    assert (tmp_path / MARKER_FILE).is_file() and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["shards", "boxes.npy", "meta.json"])
def test_store_names_that_objcrop_did_not_write_are_refused_by_name(tmp_path, name):
    if name == "shards":
        (tmp_path / "shards").mkdir()
        (tmp_path / "shards" / "mine.txt").write_text("mine")
    else:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match=f"{tmp_path / name} was not written by objcrop"):
        claim_folder(tmp_path)
    assert not (tmp_path / MARKER_FILE).exists()


def test_a_store_of_an_earlier_objcrop_is_recognised_by_its_meta(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1, "backend": "random"}))
    (tmp_path / "boxes.npy").write_bytes(b"")
    claim_folder(tmp_path)
    assert (tmp_path / MARKER_FILE).is_file()


def test_claiming_a_regular_file_is_an_os_error_naming_it(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError) as info:
        claim_folder(tmp_path / "f")
    assert info.value.filename == str(tmp_path / "f")


def test_remove_files_deletes_the_listed_names_and_their_temporary_files_only(tmp_path):
    for name in ("a.npz", ".a.npz.k2j_x9.tmp", "b.npz", ".b.npz.zz.tmp", ".a.npzX.q.tmp", "a.npz.bak"):
        (tmp_path / name).write_text("x")
    remove_files(tmp_path, ["a.npz", "missing.npz"])
    assert sorted(os.listdir(tmp_path)) == [".a.npzX.q.tmp", ".b.npz.zz.tmp", "a.npz.bak", "b.npz"]


# ---------------------------------------------------------------------- lock


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(folder, pid, host=None, name=f"{LOCK_PREFIX}.lock"):
    path = folder / name
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return path


def test_a_live_holder_is_named_with_its_pid(tmp_path, live_process):
    lock = _write_lock(tmp_path, live_process.pid)
    with pytest.raises(FolderLockedError) as info, folder_lock(tmp_path):
        pass
    message = str(info.value)
    assert f"another objcrop propose (pid {live_process.pid}) is writing {tmp_path}" in message
    assert str(lock) in message and lock.exists()  # someone else's lock is left alone


def test_a_dead_holder_on_this_host_is_a_stale_lock_taken_over(tmp_path, live_process):
    live_process.kill()
    live_process.wait()
    lock = _write_lock(tmp_path, live_process.pid)
    with folder_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_lock_left_with_our_own_pid_is_stale(tmp_path):
    """Containers reuse pids: a dead run's lock may carry the pid this process has now."""
    _write_lock(tmp_path, os.getpid())
    with folder_lock(tmp_path):
        pass


def test_a_lock_of_another_host_cannot_be_checked_and_is_refused(tmp_path):
    _write_lock(tmp_path, 1234, host="node-17")
    with pytest.raises(FolderLockedError, match=r"pid 1234 on node-17"), folder_lock(tmp_path):
        pass


def test_the_lock_is_released_on_errors_and_is_not_reentrant(tmp_path):
    with pytest.raises(RuntimeError), folder_lock(tmp_path):
        raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
    with folder_lock(tmp_path), pytest.raises(FolderLockedError), folder_lock(tmp_path):
        pass


def test_shards_run_side_by_side_but_not_beside_a_whole_folder_run(tmp_path, live_process):
    with folder_lock(tmp_path, (0, 3)), folder_lock(tmp_path, (1, 3)):
        assert len(list(tmp_path.glob(f"{LOCK_PREFIX}-*.lock"))) == 2
    _write_lock(tmp_path, live_process.pid, name=f"{LOCK_PREFIX}-2-of-3.lock")
    with pytest.raises(FolderLockedError, match=f"pid {live_process.pid}"), folder_lock(tmp_path):
        pass  # a merge waits for the shards
    _write_lock(tmp_path, live_process.pid)
    with pytest.raises(FolderLockedError), folder_lock(tmp_path, (0, 3)):
        pass  # a shard waits for a whole-folder run
    assert not (tmp_path / f"{LOCK_PREFIX}-0-of-3.lock").exists()
