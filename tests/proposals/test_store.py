import json
import pickle

import numpy as np
import pytest

from objcrop.data.records import Record, Records
from objcrop.proposals import IncompleteStoreError, ProposalStore, StaleStoreError, open_proposals
from objcrop.proposals import store as store_module
from objcrop.proposals.store import META_FILE, CorruptStoreError, check_proposal_arrays
from tests import conftest
from tests.conftest import make_store


def make_records(sizes=((64, 48), (32, 32), (80, 40)), keys=None) -> Records:
    """Three images (ids 100, 101, 102) of three boxes each, two classes."""
    return conftest.make_records(
        [[[0, 0, w / 4, h / 4], [0, 0, w / 2, h / 2], [w / 2, 0, w, h]] for w, h in sizes],
        size=sizes,
        labels=[[0, 1, 0]] * len(sizes),
        class_names=("a", "b"),
        paths=keys or [f"img_{i}.jpg" for i in range(len(sizes))],
        root="/nowhere",
        first_image_id=100,
    )


def test_round_trip_is_memory_mapped_and_equal(tmp_path):
    records = make_records()
    store = make_store(records)
    store.save(tmp_path / "s")
    back = ProposalStore.open(tmp_path / "s", records)
    assert len(back) == len(store) == 3
    assert not back.boxes.flags.owndata and not back.boxes.flags.writeable  # a read-only map, not a copy
    for i in range(len(store)):
        np.testing.assert_array_equal(back.boxes_of(i), store.boxes_of(i))
        np.testing.assert_array_equal(back.scores_of(i), store.scores_of(i))
        assert back.boxes_of(i).dtype == np.float32 and back.scores_of(i).dtype == np.float32
    assert back.boxes_of(1).shape == (0, 4)
    assert list(back.keys) == records.keys() and back.keys == records.keys()
    np.testing.assert_array_equal(back.widths, records.widths)
    np.testing.assert_array_equal(back.heights, records.heights)
    np.testing.assert_array_equal(back.image_ids, [100, 101, 102])
    assert back.meta["backend"] == "test" and back.meta["params"] == {"k": 1}
    assert back.meta["counts"] == {"images": 3, "boxes": 8, "empty": 1, "failed": 0}
    assert "created" in back.meta


def test_files_load_without_pickle(tmp_path):
    records = make_records()
    make_store(records).save(tmp_path / "s")
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert META_FILE in files and not any(name.endswith(".tmp") for name in files)
    for path in (tmp_path / "s").glob("*.npy"):
        arr = np.load(path, allow_pickle=False)
        assert arr.dtype != object
    json.loads((tmp_path / "s" / META_FILE).read_text())


def test_stale_store_errors_say_how_it_differs(tmp_path):
    records = make_records()
    make_store(records).save(tmp_path / "s")

    with pytest.raises(StaleStoreError, match="store has 3 images, dataset has 2"):
        ProposalStore.open(tmp_path / "s", records.subset([0, 1]))
    renamed = make_records(keys=["img_0.jpg", "other.jpg", "img_2.jpg"])
    with pytest.raises(StaleStoreError, match=r"1 of 3 image keys differ, first: index 1 store 'img_1.jpg' vs dataset"):
        ProposalStore.open(tmp_path / "s", renamed)
    resized = make_records(sizes=((48, 64), (32, 32), (80, 41)))
    expect = "2 of 3 images differ in size, first: img_0.jpg store 64x48 vs dataset 48x64"
    with pytest.raises(StaleStoreError, match=expect):
        ProposalStore.open(tmp_path / "s", resized)
    assert issubclass(StaleStoreError, ValueError)
    ProposalStore.open(tmp_path / "s")  # without records nothing is checked


def test_incomplete_and_missing_store(tmp_path):
    records = make_records()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ProposalStore.open(tmp_path / "nothing")
    make_store(records).save(tmp_path / "s")
    (tmp_path / "s" / META_FILE).unlink()
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        ProposalStore.open(tmp_path / "s", records)
    make_store(records).save(tmp_path / "s")
    (tmp_path / "s" / "scores.npy").unlink()
    with pytest.raises(FileNotFoundError, match="scores.npy"):
        ProposalStore.open(tmp_path / "s")


def test_inconsistent_arrays_are_rejected():
    keys, sizes = ["a", "b", "c"], np.full((3, 2), 8)
    with pytest.raises(ValueError, match="offsets has 3 entries for 3 images"):
        ProposalStore(np.zeros((2, 4)), np.zeros(2), [0, 1, 2], keys, sizes)
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        ProposalStore(np.zeros((2, 4)), np.zeros(1), [0, 1, 1, 2], keys, sizes)
    with pytest.raises(ValueError, match="offsets do not partition"):
        ProposalStore(np.zeros((2, 4)), np.zeros(2), [0, 2, 1, 2], keys, sizes)


def test_gt_store_orders_largest_first():
    records = make_records()
    store = ProposalStore.from_records(records)
    for i in range(len(records)):
        w, h = records.size(i)
        got = store.boxes_of(i)
        expect = np.array([[w / 2, 0, w, h], [0, 0, w / 2, h / 2], [0, 0, w / 4, h / 4]], np.float32)
        np.testing.assert_allclose(got, expect)
        np.testing.assert_array_equal(store.scores_of(i), np.ones(3, np.float32))
    top1 = ProposalStore.from_records(records, topk=1)
    assert top1.counts().tolist() == [1, 1, 1]
    np.testing.assert_array_equal(top1.boxes_of(0), store.boxes_of(0)[:1])
    assert store.meta["backend"] == "gt" and store.meta["counts"]["boxes"] == 9


def test_gt_store_drops_unusable_boxes_and_clips():
    rec = Record(
        "a.jpg",
        10,
        10,
        boxes=np.array([[2, 2, 2, 8], [-5, 1, 4, 20], [np.nan, 0, 3, 3]], np.float32),
        box_labels=np.zeros(3, np.int32),
    )
    store = ProposalStore.from_records(Records.from_records([rec], ["a"]))
    np.testing.assert_array_equal(store.boxes_of(0), [[0, 1, 4, 10]])


def test_open_proposals(tmp_path):
    records = make_records()
    gt = open_proposals("gt", records)
    np.testing.assert_array_equal(gt.boxes, ProposalStore.from_records(records).boxes)
    make_store(records).save(tmp_path / "s")
    opened = open_proposals(str(tmp_path / "s"), records)
    assert opened.meta["backend"] == "test"
    with pytest.raises(StaleStoreError):
        open_proposals(str(tmp_path / "s"), records.subset([2, 1, 0]))


def test_mapped_store_pickles_as_its_folder(tmp_path):
    records = make_records()
    make_store(records).save(tmp_path / "s")
    store = ProposalStore.open(tmp_path / "s", records)
    payload = pickle.dumps(store)
    assert len(payload) < 500
    back = pickle.loads(payload)
    np.testing.assert_array_equal(back.boxes, store.boxes)
    assert back.keys == store.keys
    in_memory = pickle.loads(pickle.dumps(ProposalStore.from_records(records)))
    assert len(in_memory.boxes) == 9


def test_saving_over_a_store_replaces_it(tmp_path):
    records = make_records()
    make_store(records).save(tmp_path / "s")
    ProposalStore.from_records(records).save(tmp_path / "s")
    back = ProposalStore.open(tmp_path / "s", records)
    assert back.meta["backend"] == "gt" and len(back.boxes) == 9


def _damage(folder, name, change):
    array = np.load(folder / f"{name}.npy")
    np.save(folder / f"{name}.npy", change(array))


def _set(index, value):
    def change(array):
        array = array.copy()
        array[index] = value
        return array

    return change


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("boxes", _set((1, 0), np.nan), r"boxes.npy row 1 \(image 0\): box \[nan, .* is not finite"),
        ("boxes", _set((6, 3), np.inf), r"boxes.npy row 6 \(image 2\).* is not finite"),
        ("scores", _set(2, np.nan), r"boxes.npy row 2 \(image 0\).*score nan is not finite"),
        ("boxes", _set(0, [9, 9, 3, 12]), r"boxes.npy row 0 \(image 0\).*x2 < x1"),
        ("boxes", _set(5, [0, 0, 90, 10]), r"boxes.npy row 5 \(image 2\).*outside its 80x40 image"),
        ("boxes", _set(5, [-1e9, 0, 5, 5]), r"row 5 \(image 2\).*outside its 80x40 image"),
        ("offsets", _set(1, 6), r"offsets.npy are not increasing from 0 \(image 1: 6 to 5\)"),
        ("offsets", _set(3, 7), r"offsets.npy end at 7 for 8 boxes and 8 scores"),
        ("sizes", _set((1, 0), 0), r"sizes.npy hold a size that is not positive \(image 1: \[0, 32\]\)"),
        ("boxes", lambda a: a.astype(np.float64), r"boxes.npy holds float64 with 2 dimensions, want float32"),
        ("key_offsets", _set(3, 2), r"key_offsets.npy does not partition key_blob.npy"),
        ("image_ids", lambda a: a[:2], r"image_ids.npy has shape \(2,\), want \(3,\)"),
    ],
)
def test_impossible_values_are_refused_on_open_naming_the_file(tmp_path, name, change, message):
    records = make_records()
    make_store(records).save(tmp_path / "s")
    _damage(tmp_path / "s", name, change)
    with pytest.raises(CorruptStoreError, match=message) as info:
        ProposalStore.open(tmp_path / "s", records)
    assert str(tmp_path / "s") in str(info.value)
    assert issubclass(CorruptStoreError, ValueError)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("boxes.npy", b"", r"boxes.npy cannot be read"),
        ("offsets.npy", b"\x93NUMPY garbage", r"offsets.npy cannot be read"),
        (META_FILE, b"{not json", r"meta.json is not valid JSON"),
        (META_FILE, b"[1, 2]", r"meta.json holds no JSON object"),
    ],
)
def test_unreadable_store_files_are_named(tmp_path, name, content, message):
    records = make_records()
    make_store(records).save(tmp_path / "s")
    (tmp_path / "s" / name).write_bytes(content)
    with pytest.raises(CorruptStoreError, match=message):
        ProposalStore.open(tmp_path / "s")


def test_boxes_on_the_border_and_within_the_slack_are_fine(tmp_path):
    records = make_records()
    store = make_store(records)
    store.boxes[0] = [0, 0, 64, 48]  # the whole image
    store.boxes[5] = [-0.5, 0, 80.5, 40.25]  # another writer's rounding
    store.save(tmp_path / "s")
    np.testing.assert_array_equal(ProposalStore.open(tmp_path / "s", records).boxes_of(0)[0], [0, 0, 64, 48])


def test_check_proposal_arrays_goes_block_by_block(monkeypatch):
    """A bad box in a later block, and an image whose boxes straddle two blocks."""
    monkeypatch.setattr(store_module, "_CHECK_ROWS", 3)
    sizes = np.array([[10, 10], [20, 5]])
    offsets = np.array([0, 4, 8])
    boxes = np.tile(np.array([[0, 0, 5, 5]], np.float32), (8, 1))
    check_proposal_arrays(boxes, np.zeros(8, np.float32), offsets, sizes, "here")
    boxes[3] = [0, 0, 5, 9]  # fine in image 0 (10 high), in the block of rows 3-5 that starts image 1
    check_proposal_arrays(boxes, np.zeros(8, np.float32), offsets, sizes, "here")
    boxes[4] = [0, 0, 5, 9]  # image 1 is only 5 high
    with pytest.raises(CorruptStoreError, match=r"here: boxes.npy row 4 \(image 1\).*outside its 20x5 image"):
        check_proposal_arrays(boxes, np.zeros(8, np.float32), offsets, sizes, "here")
    boxes[4] = [0, 0, 5, 5]
    boxes[7] = [0, 0, 20, 7]
    with pytest.raises(CorruptStoreError, match=r"here: boxes.npy row 7 \(image 1\).*outside its 20x5 image"):
        check_proposal_arrays(boxes, np.zeros(8, np.float32), offsets, sizes, "here")
