import numpy as np
import pytest

from objcrop.data.records import Record, Records


def _records(widths, paths=("a.jpg", "b.jpg")) -> Records:
    n = len(paths)
    return Records(
        root="",
        paths=list(paths),
        widths=widths,
        heights=[10] * n,
        boxes=np.zeros((0, 4), np.float32),
        box_labels=[],
        box_offsets=[0] * (n + 1),
        labels=[],
        label_offsets=[0] * (n + 1),
        class_names=[],
    )


@pytest.mark.parametrize("width", [10**12, 2**31, -(2**31) - 1])
def test_sizes_that_do_not_fit_int32_are_an_error_not_a_wrap_around(width):
    with pytest.raises(ValueError, match=r"image 'b.jpg': width .* does not fit int32"):
        _records(np.array([5, width], np.int64))


def test_sizes_that_fit_are_kept():
    assert _records([5, 2**31 - 1]).widths.tolist() == [5, 2**31 - 1]


def test_a_path_that_is_not_utf8_is_named_by_its_bytes():
    bad = b"bad\xff.jpg".decode("utf-8", "surrogateescape")  # what os.listdir gives for such a name
    with pytest.raises(ValueError, match=r"image path b'bad\\xff.jpg' is not valid UTF-8"):
        _records([5, 5], paths=("a.jpg", bad))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        Records.from_records([Record(bad, 4, 4)], [])
