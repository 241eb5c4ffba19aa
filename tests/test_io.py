"""objcrop.io: atomic writes, and replacing only the files objcrop can prove it wrote."""

import json
import os

import pytest

from objcrop.io import atomic_open, check_replaceable, json_is_ours, write_json_atomic, write_text_atomic


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"old": 1})
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write('{"new": ')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["summary.json"]


def test_the_new_content_appears_only_at_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    write_text_atomic(path, "old report")
    seen = []

    def replace(src, dst):  # what a reader sees just before the rename
        seen.append(path.read_text())
        os.rename(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_text_atomic(path, "new report")
    assert seen == ["old report"] and path.read_text() == "new report"


def test_an_absent_path_or_our_file_may_be_written(tmp_path):
    path = tmp_path / "out.json"
    assert check_replaceable(path, lambda p: False) == path  # absent: nothing to prove
    path.write_text("ours")
    assert check_replaceable(str(path), lambda p: p.read_text() == "ours") == path


def test_a_foreign_file_is_a_value_error_naming_it_and_is_left_alone(tmp_path):
    path = tmp_path / "notes.json"
    path.write_bytes(b"the user's")
    with pytest.raises(ValueError, match=f"{path} was not written by objcrop and would be replaced; choose another"):
        check_replaceable(path, lambda p: False)
    assert path.read_bytes() == b"the user's"


def test_a_folder_is_an_is_a_directory_error(tmp_path):
    with pytest.raises(IsADirectoryError) as err:
        check_replaceable(tmp_path, lambda p: True)
    assert err.value.filename == str(tmp_path)


@pytest.mark.parametrize(
    ("text", "ours"),
    [('{"written_by": "objcrop"}', True), ('{"written_by": "me"}', False), ("[1]", False), ("{", False), ("", False)],
)
def test_json_is_ours_needs_a_json_object_with_the_proof(tmp_path, text, ours):
    path = tmp_path / "x.json"
    path.write_text(text)
    assert json_is_ours(path, lambda obj: obj.get("written_by") == "objcrop") is ours
    assert json_is_ours(tmp_path / "missing.json", lambda obj: True) is False
