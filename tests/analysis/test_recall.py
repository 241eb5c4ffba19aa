import json

import numpy as np
import pytest

from objcrop import boxes as B
from objcrop import cli
from objcrop.analysis.recall import (
    NEVER,
    first_hit_ranks,
    plot_recall_curves,
    recall_at_k,
    recall_table,
)
from tests.conftest import make_records


class ListStore:
    """Proposals held in a list, one array per image."""

    def __init__(self, boxes):
        self.boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]

    def __len__(self):
        return len(self.boxes)

    def boxes_of(self, i):
        return self.boxes[i]


FAR = [60, 60, 70, 70]  # overlaps none of the GT boxes below


def test_gt_box_at_rank_3_is_recalled_at_10_not_at_1():
    records = make_records([[[0, 0, 10, 10]]])
    store = ListStore([[FAR, FAR, [0, 0, 10, 10], FAR]])
    result = recall_at_k(records, store)
    assert result.first_rank.tolist() == [[2], [2]]
    assert result.at(1, 0.5) == 0.0
    assert result.at(2, 0.5) == 0.0
    assert result.at(3, 0.5) == 1.0
    assert result.at(10, 0.7) == 1.0


@pytest.mark.parametrize(
    ("proposal", "iou", "recalled"),
    [
        ([0, 0, 10, 5], 0.5, True),  # IoU exactly 0.5
        ([0, 0, 10, 4.9], 0.5, False),  # 0.49
        ([0, 0, 10, 7], 0.7, True),  # IoU exactly 0.7, which float32 rounds below float64's 0.7
        ([0, 0, 10, 6.9], 0.7, False),
    ],
)
def test_threshold_is_inclusive(proposal, iou, recalled):
    records = make_records([[[0, 0, 10, 10]]])
    result = recall_at_k(records, ListStore([[proposal]]), ks=(1,), ious=(iou,))
    assert result.at(1, iou) == float(recalled)


def test_images_without_proposals_or_without_gt():
    records = make_records([[[0, 0, 10, 10], [20, 20, 40, 40]], [[50, 50, 60, 60]], []])
    store = ListStore([[[20, 20, 40, 40]], [], [[0, 0, 5, 5]] * 4])
    result = recall_at_k(records, store, ks=(1, 10))
    assert result.num_gt == 3  # the image without GT adds nothing to the denominator
    assert result.images == 3
    assert result.at(10, 0.5) == pytest.approx(1 / 3)  # the image without proposals recalls nothing
    assert result.proposals_per_image == pytest.approx(5 / 3)
    assert result.max_proposals == 4
    assert result.first_rank[0].tolist() == [NEVER, 0, NEVER]


def test_first_hit_ranks_takes_the_first_covering_proposal():
    gt = [[0, 0, 10, 10]]
    proposals = [FAR, [0, 0, 10, 6], [0, 0, 10, 10], [1, 1, 10, 10]]
    assert first_hit_ranks(gt, proposals, (0.5, 0.7, 0.9)).tolist() == [[1], [2], [2]]
    assert first_hit_ranks(np.zeros((0, 4)), proposals, (0.5,)).shape == (1, 0)
    assert first_hit_ranks(gt, np.zeros((0, 4)), (0.5,)).tolist() == [[NEVER]]


def brute_force_recall(records, store, k, threshold):
    hit = total = 0
    for i in range(len(records)):
        for g in records.boxes_of(i):
            total += 1
            top = store.boxes_of(i)[:k]
            hit += any(B.iou(g, p)[0, 0] >= np.float32(threshold) for p in top)
    return hit / total


def random_boxes(rng, n):
    xy = rng.uniform(0, 80, size=(n, 2))
    wh = rng.uniform(2, 40, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_matches_brute_force_and_curve_is_monotone():
    rng = np.random.default_rng(0)
    records = make_records([random_boxes(rng, rng.integers(0, 6)) for _ in range(12)])
    store = ListStore([random_boxes(rng, rng.integers(0, 60)) for _ in range(12)])
    result = recall_at_k(records, store, ks=(1, 5, 20, 100), ious=(0.3, 0.5))
    for t in (0.3, 0.5):
        curve = result.curve(t)
        assert len(curve) == result.max_proposals
        assert np.all(np.diff(curve) >= 0)
        for k in (1, 2, 5, 20, 37, result.max_proposals):
            assert result.at(k, t) == pytest.approx(brute_force_recall(records, store, k, t))
            assert curve[k - 1] == pytest.approx(result.at(k, t))
        assert result.at(10**6, t) == pytest.approx(curve[-1])
    assert result.curve(0.3)[-1] > 0  # the data is not trivially all-miss


def test_to_dict_shape():
    records = make_records([[[0, 0, 10, 10]], [[0, 0, 50, 50]]])
    store = ListStore([[[0, 0, 10, 10]], [[0, 0, 40, 40], [0, 0, 50, 50]]])
    d = recall_at_k(records, store).to_dict()
    assert set(d) == {"recall", "proposals_per_image"}
    assert set(d["recall"]) == {"0.5", "0.7"}
    for by_k in d["recall"].values():
        assert list(by_k) == ["1", "10", "100", "1000"]
    assert d["recall"]["0.5"]["1"] == 1.0  # IoU 0.64 at rank 0
    assert d["recall"]["0.7"]["1"] == 0.5
    assert d["recall"]["0.7"]["10"] == 1.0
    assert d["proposals_per_image"] == 1.5
    json.dumps(d)


def test_with_a_gt_proposal_store():
    from objcrop.proposals import ProposalStore

    rng = np.random.default_rng(1)
    records = make_records([random_boxes(rng, n) for n in (3, 0, 5)], size=(200, 200))
    result = recall_at_k(records, ProposalStore.from_records(records), ks=(5,), ious=(0.5, 0.99))
    assert result.at(5, 0.99) == 1.0
    assert result.num_gt == 8


def test_bad_arguments():
    records = make_records([[[0, 0, 10, 10]]])
    with pytest.raises(ValueError, match="store has 2 images"):
        recall_at_k(records, ListStore([[], []]))
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(records, ListStore([[]]), ks=(0,))
    with pytest.raises(ValueError, match="IoU"):
        recall_at_k(records, ListStore([[]]), ious=(1.5,))
    result = recall_at_k(records, ListStore([[]]))
    with pytest.raises(ValueError, match="not evaluated"):
        result.at(1, 0.9)


def test_table_and_plot(tmp_path):
    records = make_records([[[0, 0, 10, 10]], [[20, 20, 60, 60]]])
    results = {
        "good": recall_at_k(records, ListStore([[[0, 0, 10, 10]], [FAR, [20, 20, 60, 60]]])),
        "empty": recall_at_k(records, ListStore([[], []])),
    }
    table = recall_table(results)
    assert "R@1000" in table and "good" in table and "empty" in table
    out = plot_recall_curves(results, tmp_path / "plots" / "recall.png", iou=0.5)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["recall.png"]  # no temporary file left
    with pytest.raises(ValueError, match="not evaluated"):
        plot_recall_curves(results, tmp_path / "x.png", iou=0.9)


def test_analyze_recall_command(tmp_path, capsys):
    import argparse

    from PIL import Image

    from objcrop.commands.analyze_recall import add_recall_parser

    images = tmp_path / "images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, bbox in enumerate([[10, 10, 20, 30], [5, 5, 40, 40]]):
        Image.new("RGB", (64, 48)).save(images / f"{i}.jpg")
        coco["images"].append({"id": i + 1, "file_name": f"{i}.jpg", "width": 64, "height": 48})
        coco["annotations"].append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": bbox, "area": 1.0, "iscrowd": 0}
        )
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    parser = argparse.ArgumentParser()
    add_recall_parser(parser.add_subparsers())
    argv = ["recall", "--format", "coco", "--annotations", str(tmp_path / "ann.json"), "--images", str(images)]
    args = parser.parse_args([*argv, "--proposals", "gt", "--k", "1", "5", "--json", "--plot", str(tmp_path / "r.png")])
    assert args.func(args) == 0
    line = json.loads(capsys.readouterr().out)
    assert line == {
        "proposals": "gt",
        "recall": {"0.5": {"1": 1.0, "5": 1.0}, "0.7": {"1": 1.0, "5": 1.0}},
        "proposals_per_image": 1.0,
    }
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    args = parser.parse_args([*argv, "--proposals", "gt", "--proposals", "gt"])
    assert args.func(args) == 0
    assert "R@1000" in capsys.readouterr().out

    # --plot replaces objcrop's own PNG, and refuses (exit code 2, before the recall) a file it did not write
    plot = ["analyze", *argv, "--proposals", "gt", "--plot", str(tmp_path / "r.png")]
    assert cli.main(plot) == 0
    Image.new("RGB", (4, 4)).save(tmp_path / "r.png")
    before = (tmp_path / "r.png").read_bytes()
    assert cli.main(plot) == 2
    assert f"{tmp_path / 'r.png'} was not written by objcrop" in capsys.readouterr().err
    assert (tmp_path / "r.png").read_bytes() == before
