"""Decoding for the device path: the same upright RGB pixels as the loader path's PIL decode, the same errors,
no deprecation warning, and padded batches whose edges repeat."""

import io
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from objcrop.crops.decode import decode_image, is_jpeg, pad_images, resolve_decoder
from objcrop.data.images import ImageReadError, load_image
from tests.conftest import SHARED_DATA, needs_shared_data

COCO = SHARED_DATA / "coco128" / "train2017"


def _available(name):
    try:
        resolve_decoder(name)
    except ValueError:
        return False
    return True


JPEG_DECODERS = [name for name in ("torchvision", "torchcodec", "pil") if _available(name)]


def pil_tensor(path) -> torch.Tensor:
    return torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)


def noise(height=30, width=50, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@needs_shared_data("coco128/train2017")
@pytest.mark.parametrize("decoder", JPEG_DECODERS)
def test_coco_jpegs_decode_to_the_loader_paths_pixels(decoder):
    paths = sorted(COCO.glob("*.jpg"))[:6]
    assert paths, COCO
    for path in paths:
        image = decode_image(path, decoder)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert torch.equal(image, pil_tensor(path)), path.name


@pytest.mark.parametrize("decoder", JPEG_DECODERS)
def test_exif_orientation_grayscale_and_cmyk_jpegs_match_pil(tmp_path, decoder):
    image = PIL.Image.fromarray(noise())
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image.convert("L").save(tmp_path / "gray.jpg")
    image.convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("rotated.jpg", "gray.jpg", "cmyk.jpg"):
        decoded = decode_image(tmp_path / name, decoder)
        assert torch.equal(decoded, pil_tensor(tmp_path / name)), name
    assert decode_image(tmp_path / "rotated.jpg", decoder).shape == (3, 50, 30)


def test_png_with_alpha_goes_through_pil_and_is_composited_on_gray(tmp_path):
    rgba = np.concatenate([noise(), np.zeros((30, 50, 1), np.uint8)], axis=2)  # fully transparent
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    decoded = decode_image(tmp_path / "clear.png")
    assert decoded.shape == (3, 30, 50)
    assert torch.equal(decoded, pil_tensor(tmp_path / "clear.png"))
    assert (decoded == 128).all()


@pytest.mark.parametrize("decoder", JPEG_DECODERS)
def test_bad_files_raise_the_loader_paths_errors_naming_the_file(tmp_path, decoder):
    good = io.BytesIO()
    PIL.Image.fromarray(noise(64, 64)).save(good, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 20)
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("truncated.jpg", "garbage.jpg", "empty.jpg"):
        with pytest.raises(ImageReadError, match=name):
            decode_image(tmp_path / name, decoder)
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "missing.jpg", decoder)


def test_torchvision_decoder_emits_no_deprecation_warning(tmp_path):
    if not _available("torchvision"):
        pytest.skip("this torchvision has no decode_jpeg")
    PIL.Image.fromarray(noise()).save(tmp_path / "a.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_image(tmp_path / "a.jpg", "torchvision")


def test_decoder_names_are_checked():
    with pytest.raises(ValueError, match="unknown decoder 'nvjpeg'"):
        resolve_decoder("nvjpeg")
    assert resolve_decoder("auto") in ("torchvision", "torchcodec", "pil")
    assert resolve_decoder("pil") == "pil"


def test_is_jpeg_reads_the_magic_bytes():
    assert is_jpeg(b"\xff\xd8\xff\xe0rest") and not is_jpeg(b"\x89PNG\r\n") and not is_jpeg(b"")


def test_pad_images_places_images_top_left_and_repeats_their_last_row_and_column():
    a = torch.arange(3 * 2 * 3, dtype=torch.uint8).view(3, 2, 3)
    b = torch.full((3, 4, 2), 200, dtype=torch.uint8)
    out = pad_images([a, b])
    assert out.shape == (2, 3, 4, 3) and out.dtype == torch.uint8
    assert torch.equal(out[0, :, :2, :3], a) and torch.equal(out[1, :, :, :2], b)
    assert torch.equal(out[0, :, 2, :3], a[:, 1])  # the row below the image repeats its last row
    assert torch.equal(out[1, :, :, 2], b[:, :, 1])  # the column right of it repeats its last column
    assert (out[0, :, 3] == 0).all()  # further padding is zero


def test_pad_images_rejects_what_is_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        pad_images([torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match="no images"):
        pad_images([])
