import gc
import logging
import os
import types

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from objcrop.crops.dataset import NoUsableImageError, ObjectAwareDataset
from objcrop.crops.policies import KIND_CODES, POLICIES, ViewPairPolicy
from objcrop.data.records import Records
from tests import conftest

try:
    from objcrop.proposals.store import ProposalStore
except ImportError:  # the store lives in another module of the package; any boxes_of(i) will do
    ProposalStore = None

BOXES = np.array([[4, 4, 40, 30], [10, 8, 60, 44], [0, 0, 20, 20]], np.float32)


class ArrayStore:
    def __init__(self, boxes, offsets):
        self.boxes, self.offsets = boxes, offsets

    def boxes_of(self, i):
        return self.boxes[self.offsets[i] : self.offsets[i + 1]]


def make_store(records: Records):
    if ProposalStore is None:
        return ArrayStore(records.boxes, records.box_offsets)
    return ProposalStore.from_records(records)


def write_images(folder, count, size=(64, 48)):
    rng = np.random.default_rng(0)
    names = []
    for k in range(count):
        name = f"img{k}.jpg"
        PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def make_records(folder, names, size=(64, 48), boxes=BOXES):
    """Records of the images ``names`` in ``folder``, each with ``boxes``."""
    return conftest.make_records([boxes] * len(names), size=size, paths=names, root=str(folder))


@pytest.fixture
def records(tmp_path):
    return make_records(tmp_path, write_images(tmp_path, 3))


def test_sample_has_two_views_kind_codes_index_and_replaced(records):
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-scene"), size=32, seed=0)
    assert len(dataset) == 3
    sample = dataset[1]
    assert set(sample) == {"views", "kinds", "index", "replaced", "fallback"}
    assert [v.shape for v in sample["views"]] == [(3, 32, 32)] * 2
    assert sample["views"][0].dtype == torch.float32
    assert sample["kinds"].dtype == torch.int64 and sorted(sample["kinds"].tolist()) == sorted(
        [KIND_CODES["object"], KIND_CODES["scene"]]
    )
    assert (sample["index"], sample["replaced"]) == (1, 0)
    assert dataset[-1]["index"] == 2
    with pytest.raises(IndexError):
        dataset[3]


def test_images_without_proposals_fall_back_to_scene_views_and_are_counted(tmp_path):
    records = make_records(tmp_path, write_images(tmp_path, 2), boxes=np.zeros((0, 4), np.float32))
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-obj-dilate"), size=16, seed=0)
    assert dataset[0]["kinds"].tolist() == [KIND_CODES["scene"]] * 2
    assert dataset.view_pair.stats.fallbacks == 1


def test_pair_of_transforms_and_custom_size(records):
    transforms = (v2.PILToTensor(), v2.Compose([v2.PILToTensor(), v2.Grayscale()]))
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-obj"), transform=transforms, size=20)
    views = dataset[0]["views"]
    assert views[0].shape == (3, 20, 20) and views[1].shape == (1, 20, 20)


def test_default_collate_batches_views_and_kinds(records):
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("dilate-dilate"), size=16, seed=0)
    (batch,) = DataLoader(dataset, batch_size=3)
    assert [v.shape for v in batch["views"]] == [(3, 3, 16, 16)] * 2
    assert batch["kinds"].tolist() == [[KIND_CODES["dilated"]] * 2] * 3
    assert batch["index"].tolist() == [0, 1, 2]


def test_unreadable_images_are_logged_counted_and_replaced(tmp_path, caplog):
    names = write_images(tmp_path, 2)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    names = [names[0], "broken.jpg", "missing.jpg", names[1]]
    records = make_records(tmp_path, names)
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-scene"), size=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="objcrop.crops.dataset"):
        sample = dataset[1]
    assert (sample["index"], sample["replaced"]) == (3, 2)
    assert dataset.skipped == 2
    text = caplog.text
    assert str(tmp_path / "broken.jpg") in text and str(tmp_path / "missing.jpg") in text
    # The last record wraps around to the first.
    assert dataset[2]["index"] == 3


def test_a_decoded_size_that_differs_from_the_record_is_skipped(tmp_path, caplog):
    names = write_images(tmp_path, 2)
    records = make_records(tmp_path, names, size=(64, 40))
    records.heights[1] = 48  # only the second record matches its file
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-scene"), size=16)
    with caplog.at_level(logging.WARNING, logger="objcrop.crops.dataset"):
        assert dataset[0]["index"] == 1
    assert "differs from the record" in caplog.text and "img0.jpg" in caplog.text


def test_raises_only_when_no_record_is_usable(tmp_path):
    for k in range(5):
        (tmp_path / f"bad{k}.jpg").write_bytes(b"")
    records = make_records(tmp_path, [f"bad{k}.jpg" for k in range(5)])
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy(), size=16, max_tries=3)
    with pytest.raises(NoUsableImageError, match=r"none of the 5 records can be used .*bad0\.jpg"):
        dataset[2]
    assert dataset.skipped == 5
    with pytest.raises(NoUsableImageError):
        dataset[0]
    assert dataset.skipped == 5  # known-bad records are not read again


def test_a_run_of_bad_records_longer_than_max_tries_is_scanned_past_and_remembered(tmp_path, caplog):
    """30 corrupt JPEGs in a row, max_tries 10: the sample comes from the first good record after them."""
    good = write_images(tmp_path, 3)
    for k in range(30):
        (tmp_path / f"bad{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    names = [good[0], *[f"bad{k}.jpg" for k in range(30)], good[1], good[2]]
    records = make_records(tmp_path, names)
    dataset = ObjectAwareDataset(
        records, make_store(records), ViewPairPolicy("obj-scene"), size=16, seed=0, max_tries=10
    )
    with caplog.at_level(logging.WARNING, logger="objcrop.crops.dataset"):
        sample = dataset[1]
    assert (sample["index"], sample["replaced"]) == (31, 30)
    assert dataset.skipped == 30 and dataset.known_bad == set(range(1, 31))
    assert "unusable records in a row from record 1" in caplog.text
    # Later samples in the run skip the known-bad records without reading them again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="objcrop.crops.dataset"):
        assert (dataset[20]["index"], dataset[20]["replaced"]) == (31, 11)
    assert dataset.skipped == 30 and caplog.text == ""
    # The views depend on the requested index, not on how many records were skipped.
    fresh = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-scene"), size=16, seed=0)
    fresh.known_bad.update(range(1, 31))
    assert all(torch.equal(a, b) for a, b in zip(fresh[1]["views"], sample["views"], strict=True))
    assert fresh.skipped == 0


def test_rejects_a_store_without_boxes_of(records):
    with pytest.raises(TypeError, match="boxes_of"):
        ObjectAwareDataset(records, object(), ViewPairPolicy())


def test_every_policy_yields_its_kinds(records):
    store = make_store(records)
    for name, kinds in POLICIES.items():
        codes = ObjectAwareDataset(records, store, ViewPairPolicy(name), size=8, seed=0)[0]["kinds"].tolist()
        assert sorted(codes) == sorted(KIND_CODES[k] for k in kinds)


def synthetic_records(folder, n: int) -> Records:
    """``n`` records with three boxes each, all pointing to four tiny real images, built as arrays."""
    names = write_images(folder, 4)
    boxes = np.tile(BOXES, (n, 1))
    return Records(
        str(folder), [names[i % 4] for i in range(n)], np.full(n, 64), np.full(n, 48), boxes,
        np.zeros(len(boxes), np.int32), np.arange(n + 1, dtype=np.int64) * len(BOXES), np.zeros(0, np.int32),
        np.zeros(n + 1, np.int64), ["thing"],
    )  # fmt: skip


def count_reachable(root) -> int:
    """Python objects reachable from ``root``, not descending into modules, classes and functions."""
    stop = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, stop):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_dataset_holds_as_many_python_objects_for_100k_records_as_for_10(tmp_path):
    counts = []
    for n in (10, 100_000):
        records = synthetic_records(tmp_path, n)
        dataset = ObjectAwareDataset(records, ArrayStore(records.boxes, records.box_offsets), ViewPairPolicy())
        counts.append(count_reachable(dataset))
    # A few scalars depend on n (the policy's calibration counts images; a small int may coincide with
    # another field and be shared): per-record objects would add ~100k.
    assert abs(counts[1] - counts[0]) <= 3


def private_kib() -> int:
    """Private (unshared) resident memory of this process in KiB: what copy-on-write un-shares."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


class MemoryProbe(Dataset):
    """Wraps a dataset and reports, from inside the worker, its pid and private memory."""

    def __init__(self, dataset, every):
        self.dataset, self.every, self.calls = dataset, every, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        self.calls += 1
        memory = private_kib() if self.calls % self.every == 0 else -1
        return {"kinds": sample["kinds"], "pid": os.getpid(), "calls": self.calls, "private_kib": memory}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc/<pid>/smaps_rollup")
def test_worker_memory_stays_flat_over_100k_records(tmp_path):
    n, workers, samples = 100_000, 4, 2000
    records = synthetic_records(tmp_path, n)
    # The boxes as arrays directly: ProposalStore.from_records visits the records one by one (slow for 100k).
    store = ArrayStore(records.boxes, records.box_offsets)
    dataset = ObjectAwareDataset(records, store, ViewPairPolicy("obj-obj-dilate"), v2.PILToTensor(), 32)
    loader = DataLoader(
        MemoryProbe(dataset, every=50),
        batch_size=16,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    readings: dict[int, list[int]] = {}
    seen = 0
    for batch in loader:
        for pid, memory in zip(batch["pid"].tolist(), batch["private_kib"].tolist(), strict=True):
            if memory >= 0:
                readings.setdefault(pid, []).append(memory)
        seen += len(batch["pid"])
        if seen >= samples:
            break
    assert len(readings) == workers
    for pid, kib in readings.items():
        assert len(kib) >= 8, f"worker {pid} reported only {len(kib)} times"
        early, late = kib[2], kib[-1]  # after 150 samples (warm-up) and at the end
        growth_mib = (late - early) / 1024
        # A copy of per-sample Python objects would grow with every record touched; arrays stay shared.
        assert growth_mib < 8, f"worker {pid} private memory grew {growth_mib:.1f} MiB: {kib}"


def test_seeded_samples_depend_only_on_seed_epoch_and_index(records):
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-obj-dilate"), size=32, seed=7)
    first = dataset[1]
    dataset[0], dataset[2]  # other samples in between must not change sample 1
    torch.manual_seed(123)  # nor the caller's torch stream
    again = dataset[1]
    for a, b in zip(first["views"], again["views"], strict=True):
        assert torch.equal(a, b)
    state = torch.get_rng_state()
    dataset[1]
    assert torch.equal(state, torch.get_rng_state()), "a seeded sample must leave the global torch RNG alone"
    dataset.set_epoch(1)
    other_epoch = dataset[1]
    assert not all(torch.equal(a, b) for a, b in zip(first["views"], other_epoch["views"], strict=True))


def test_seeded_samples_are_the_same_with_and_without_workers(records):
    dataset = ObjectAwareDataset(records, make_store(records), ViewPairPolicy("obj-scene"), size=32, seed=3)
    direct = [dataset[i]["views"][0] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    for i, sample in enumerate(loader):
        assert torch.equal(sample["views"][0], direct[i])
