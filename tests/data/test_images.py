import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from objcrop.data.images import (
    TRANSPARENT_FILL,
    ImageReadError,
    image_size,
    is_image_file,
    load_image,
    relative_image_paths,
)
from tests.conftest import SHARED_DATA, needs_shared_data


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (255, 0, 0)
    a[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def _save_with_orientation(img: Image.Image, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)


def test_rgb_jpeg_loads_with_its_size(tmp_path):
    path = tmp_path / "a.jpg"
    _halves(64, 48).save(path, quality=95)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48) == image_size(path)
    assert np.abs(np.asarray(img)[24, 10].astype(int) - (255, 0, 0)).max() < 10


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tiff"])
def test_exif_orientation_6_rotates_pixels_and_swaps_size(tmp_path, suffix):
    path = tmp_path / f"rot{suffix}"
    _save_with_orientation(_halves(40, 20), path, 6)  # 6: turn 90 degrees clockwise to show upright
    img = load_image(path)
    assert img.size == (20, 40) == image_size(path)
    a = np.asarray(img).astype(int)
    assert np.abs(a[5, 10] - (255, 0, 0)).max() < 20  # the stored left (red) side is now on top
    assert np.abs(a[35, 10] - (0, 0, 255)).max() < 20


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_png_exif_after_pixel_data_is_treated_like_the_header_says(tmp_path):
    """An eXIf chunk after IDAT is only seen after a full decode; both functions ignore it alike."""
    path = tmp_path / "late.png"
    _halves(30, 12).save(path)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = path.read_bytes()
    iend = data.rindex(b"IEND") - 4
    path.write_bytes(data[:iend] + _png_chunk(b"eXIf", exif.tobytes()) + data[iend:])
    assert image_size(path) == load_image(path).size == (30, 12)


@pytest.mark.parametrize("suffix", [".jpg", ".tiff"])
@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_orientation_gives_header_size_equal_to_decoded_size(tmp_path, orientation, suffix):
    path = tmp_path / f"o{suffix}"
    _save_with_orientation(_halves(30, 12), path, orientation)
    expected = (12, 30) if orientation >= 5 else (30, 12)
    assert image_size(path) == load_image(path).size == expected


@pytest.mark.parametrize("suffix", [".jpg", ".tiff", ".png"])
def test_orientation_3_turns_pixels_upside_down(tmp_path, suffix):
    a = np.zeros((20, 10, 3), np.uint8)
    a[:10] = (255, 0, 0)  # red top, black bottom
    path = tmp_path / f"o3{suffix}"
    _save_with_orientation(Image.fromarray(a), path, 3)
    out = np.asarray(load_image(path)).astype(int)
    assert out[2, 5, 0] < 30 and out[17, 5, 0] > 220


def test_draft_decodes_jpeg_at_reduced_size_at_least_requested(tmp_path):
    path = tmp_path / "big.jpg"
    _halves(640, 480).save(path)
    assert load_image(path, draft_size=(160, 120)).size == (160, 120)
    img = load_image(path, draft_size=(200, 150))
    assert img.size == (320, 240)  # 1/2 is the largest JPEG scale that stays >= 200x150
    assert load_image(path, draft_size=(1000, 1000)).size == (640, 480)


def test_draft_size_is_in_upright_coordinates(tmp_path):
    path = tmp_path / "big_rot.jpg"
    _save_with_orientation(_halves(800, 400), path, 6)  # upright: 400 x 800
    img = load_image(path, draft_size=(100, 200))
    assert img.size == (100, 200)


def test_draft_is_ignored_for_png(tmp_path):
    path = tmp_path / "a.png"
    _halves(64, 48).save(path)
    assert load_image(path, draft_size=(8, 6)).size == (64, 48)


def test_invalid_draft_size_is_rejected(tmp_path):
    path = tmp_path / "a.jpg"
    _halves(64, 48).save(path)
    with pytest.raises(ValueError, match="draft_size"):
        load_image(path, draft_size=(0, 10))


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK"])
def test_non_rgb_modes_become_rgb(tmp_path, mode):
    src = _halves(32, 16).convert(mode)
    path = tmp_path / f"m.{'jpg' if mode == 'CMYK' else 'png'}"
    src.save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 16)
    expected = np.asarray(src.convert("RGB")).astype(int)
    assert np.abs(np.asarray(img).astype(int) - expected).max() < 12


def test_cmyk_jpeg_colours_survive(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    assert np.abs(np.asarray(load_image(path))[8, 8].astype(int) - (255, 0, 0)).max() < 10


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_the_documented_fill(tmp_path, mode):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 255, 255, 255)  # opaque white
    a[:, 4:] = (255, 255, 255, 0)  # fully transparent white
    src = Image.fromarray(a, "RGBA").convert(mode)
    path = tmp_path / "alpha.png"
    src.save(path)
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 7]) == TRANSPARENT_FILL


def test_palette_with_transparency_uses_the_fill(tmp_path):
    src = Image.new("P", (6, 6), 0)
    src.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    src.paste(1, (3, 0, 6, 6))
    path = tmp_path / "p.png"
    src.save(path, transparency=1)
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 5]) == TRANSPARENT_FILL


def test_16_bit_png_is_scaled_by_its_value_range_not_clipped(tmp_path):
    a = np.zeros((4, 8), np.uint16)
    a[:, 2:4], a[:, 4:6], a[:, 6:] = 1000, 2000, 4000  # 12-bit data in a 16-bit PNG
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert out.tolist() == [0, 0, 64, 64, 128, 128, 255, 255]


@pytest.mark.parametrize("dtype", [">u2", "int32", "float32"])
def test_other_high_bit_depth_modes_are_scaled(tmp_path, dtype):
    a = np.array([[0, 8000, 16000, 40000]] * 2).astype(dtype)
    path = tmp_path / "deep.tiff"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode in ("I;16B", "I;16", "I", "F")
    img = load_image(path)
    assert img.mode == "RGB"
    assert np.asarray(img)[0, :, 0].tolist() == [0, 51, 102, 255]


def test_float_image_with_negative_values_and_nan(tmp_path):
    a = np.array([[-1.0, 0.0, 1.0, np.nan]], np.float32)
    path = tmp_path / "f.tiff"
    Image.fromarray(a).save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255, 128]


def test_tiny_image_loads(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (5, 3), (1, 2, 3)).save(path)
    img = load_image(path)
    assert img.size == (5, 3) == image_size(path)


def test_missing_file_raises_file_not_found_with_path(tmp_path):
    path = tmp_path / "nope.jpg"
    for fn in (load_image, image_size):
        with pytest.raises(FileNotFoundError, match="nope.jpg"):
            fn(path)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"this is not a picture\n" * 10, "cannot identify"),
        ("noise.png", bytes(range(256)) * 4, "cannot identify"),
    ],
)
def test_undecodable_files_raise_image_read_error_naming_the_path(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    for fn in (load_image, image_size):
        with pytest.raises(ImageReadError, match=reason) as info:
            fn(path)
        assert name in str(info.value) and info.value.path == str(path)
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file_fails_on_decode_but_not_on_header(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)
    with pytest.raises(ImageReadError, match="cut"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_header_raises(tmp_path):
    path = tmp_path / "bad.png"
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = b"\xff" * 8  # width and height in the IHDR chunk
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="bad.png"):
        load_image(path)


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 * 64 > 2 * 100: an error, not a warning
    for fn in (load_image, image_size):
        with pytest.raises(ImageReadError, match="decompression-bomb"):
            fn(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between the limit and twice it: a warning only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(path).size == (64, 64)
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)


def test_relative_image_paths_lists_images_recursively_and_sorted(tmp_path):
    for rel in ["b/2.png", "a/1.JPG", "top.webp", "a/notes.txt", "a/.hidden.jpg", ".cache/x.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert relative_image_paths(tmp_path) == ["a/1.JPG", "b/2.png", "top.webp"]
    assert is_image_file("x.TIF") and not is_image_file("x.gif")
    with pytest.raises(FileNotFoundError):
        relative_image_paths(tmp_path / "missing")


COCO128_IMAGES = SHARED_DATA / "coco128" / "train2017"


@needs_shared_data("coco128/train2017")
def test_real_grayscale_coco_jpeg_loads_as_rgb():
    gray = [p for p in sorted(COCO128_IMAGES.glob("*.jpg")) if Image.open(p).mode == "L"]
    assert len(gray) == 1
    img = load_image(gray[0])
    assert img.mode == "RGB" and img.size == image_size(gray[0]) == Image.open(gray[0]).size
    a = np.asarray(img)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    small = load_image(gray[0], draft_size=(img.width // 4, img.height // 4))
    assert small.mode == "RGB" and img.width // 4 <= small.width < img.width
