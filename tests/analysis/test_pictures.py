import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from objcrop import cli
from objcrop.analysis.pictures import crop_view, draw_view_pairs, figure_size, save_figure
from objcrop.crops.policies import POLICIES, ViewPairPolicy


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


def two_tone(width=120, height=80) -> Image.Image:
    """Red left half, blue right half."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_crop_view_cuts_the_box_and_resizes():
    view = crop_view(two_tone(), np.array([70, 10, 110, 70], np.float32), size=32)
    assert view.size == (32, 32)
    assert (np.asarray(view)[..., 2] > 250).all() and (np.asarray(view)[..., 0] < 5).all()


def test_every_policy_is_drawn_to_a_png(tmp_path):
    policies = [ViewPairPolicy(name, topk=3) for name in POLICIES]
    proposals = np.array([[10, 10, 50, 60], [60, 5, 110, 75], [0, 0, 120, 80]], np.float32)
    fig = draw_view_pairs(two_tone(), proposals, policies, 1, np.random.default_rng(0), gt_boxes=proposals[:2])
    found = texts(fig)
    for name in POLICIES:
        assert any(t.startswith(name) for t in found)
    assert "top-3 of 3 proposals" in found
    path = save_figure(fig, tmp_path / "sub" / "pairs.png", dpi=50)
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = figure_size(120, 80, len(POLICIES), 1)
        assert png.size == (round(width * 50), round(height * 50))
    assert [p.name for p in path.parent.iterdir()] == ["pairs.png"]  # no temporary file left


def test_image_without_proposals_notes_the_fallback():
    fig = draw_view_pairs(two_tone(), np.zeros((0, 4)), ViewPairPolicy("obj-obj-dilate"), 2, np.random.default_rng(0))
    found = texts(fig)
    assert "no proposals" in found
    assert found.count("fallback: no usable proposal") == 2
    assert "view 1: scene" in found


def test_draw_view_pairs_validates():
    with pytest.raises(ValueError, match="policy"):
        draw_view_pairs(two_tone(), np.zeros((0, 4)), [], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pairs"):
        draw_view_pairs(two_tone(), np.zeros((0, 4)), ViewPairPolicy("obj-scene"), 0, np.random.default_rng(0))


def _figure():
    return draw_view_pairs(two_tone(), np.zeros((0, 4)), ViewPairPolicy("scene-scene"), 1, np.random.default_rng(0))


def test_save_figure_replaces_its_own_png_atomically(tmp_path):
    path = tmp_path / "out.png"
    save_figure(_figure(), path, dpi=20)
    first = path.read_bytes()
    save_figure(_figure(), path, dpi=30)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.read_bytes() != first
    with Image.open(path) as png:
        assert png.info["Software"].startswith("objcrop ")  # the proof that the next run may replace it
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


@pytest.mark.parametrize("foreign", ["plain PNG", "matplotlib PNG", "not an image"])
def test_save_figure_refuses_a_file_objcrop_did_not_write(tmp_path, foreign):
    path = tmp_path / "out.png"
    if foreign == "plain PNG":
        two_tone().save(path)
    elif foreign == "matplotlib PNG":  # what objcrop wrote before the marker: matplotlib's Software chunk
        _figure().savefig(path, format="png", dpi=10)
    else:
        path.write_bytes(b"old")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"{path} was not written by objcrop"):
        save_figure(_figure(), path, dpi=30)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    save_figure(_figure(), path, dpi=30, check=False)  # a folder objcrop manages (the demo's report)
    assert path.read_bytes() != before


def write_coco(root: Path) -> tuple[Path, Path]:
    """Three 96x64 images: two with two boxes, the last one without any."""
    images = root / "images"
    images.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(3):
        name = f"{i:03d}.png"
        two_tone(96, 64).rotate(90 * i, expand=False).save(images / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": 96, "height": 64})
        if i < 2:
            for j, bbox in enumerate(([4, 4, 30, 20], [50, 30, 40, 30])):
                ann = {"id": 10 * i + j + 1, "image_id": i + 1, "category_id": 1, "bbox": bbox}
                coco["annotations"].append(ann | {"area": bbox[2] * bbox[3], "iscrowd": 0})
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(coco))
    return annotations, images


@pytest.mark.parametrize(
    ("which", "images_drawn"),
    [(["--image-index", "2", "--policy", "obj-obj-dilate"], 1), (["--random", "2", "--policy", "scene-scene"], 2)],
)
def test_cli_show_writes_a_png(tmp_path, capsys, which, images_drawn):
    annotations, images = write_coco(tmp_path)
    out = tmp_path / "crops.png"
    argv = ["show", "--format", "coco", "--annotations", str(annotations), "--images", str(images)]
    argv += ["--proposals", "gt", "--pairs", "2"]
    assert cli.main([*argv, *which, "--dpi", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed
    if "obj-obj-dilate" in which:  # the policy's resolved object-crop scale, calibrated on the proposals
        assert "obj-obj-dilate: object crop scale: paper, S_min = 0.2 / " in printed
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = figure_size(96, 64, 1, 2)
        assert png.size == (round(width * 40), round(height * images_drawn * 40))


def test_cli_show_refuses_a_foreign_out_and_replaces_its_own(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    out = tmp_path / "crops.png"
    two_tone().save(out)  # the user's picture
    before = out.read_bytes()
    argv = ["show", "--format", "coco", "--annotations", str(annotations), "--images", str(images)]
    argv += ["--proposals", "gt", "--pairs", "1", "--policy", "scene-scene", "--dpi", "20", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} was not written by objcrop" in err and "choose another --out" in err
    assert out.read_bytes() == before
    out.unlink()
    assert cli.main(argv) == 0
    first = out.read_bytes()
    assert cli.main([*argv, "--image-index", "1"]) == 0  # objcrop's own PNG: replaced
    assert out.read_bytes() != first


def test_cli_show_rejects_a_bad_index(tmp_path, capsys):
    annotations, images = write_coco(tmp_path)
    argv = ["show", "--format", "coco", "--annotations", str(annotations), "--images", str(images)]
    argv += ["--proposals", "gt", "--image-index", "7", "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
