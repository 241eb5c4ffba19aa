"""objcrop.io: replacing only the files objcrop can prove it wrote."""

import pytest

from objcrop.io import check_replaceable, json_is_ours


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
