import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ImageFilter
from torchvision import tv_tensors
from torchvision.transforms import v2

from objcrop.crops.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomGaussianBlur,
    RandomSolarize,
    byol_view_transforms,
    moco_v2_view_transform,
)


@pytest.fixture
def pil_image():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def as_inputs(image):
    tensor = v2.functional.pil_to_tensor(image)
    return {"pil": image, "uint8": tensor, "float": tensor.float() / 255, "tv_image": tv_tensors.Image(tensor)}


def test_blur_on_pil_matches_pil_image_filter(pil_image):
    torch.manual_seed(0)
    blur = RandomGaussianBlur((0.1, 2.0), p=1.0)
    out = blur(pil_image)
    torch.manual_seed(0)
    sigma = blur.make_params([pil_image])["sigma"]
    expected = pil_image.filter(ImageFilter.GaussianBlur(radius=sigma))
    assert isinstance(out, PIL.Image.Image)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_blur_on_tensors_matches_torchvision_with_a_three_sigma_kernel(pil_image):
    x = v2.functional.pil_to_tensor(pil_image)
    torch.manual_seed(3)
    out = RandomGaussianBlur((1.5, 1.5), p=1.0)(x)
    np.testing.assert_array_equal(out.numpy(), v2.functional.gaussian_blur(x, [11, 11], [1.5, 1.5]).numpy())
    image = tv_tensors.Image(x)
    assert isinstance(RandomGaussianBlur(p=1.0)(image), tv_tensors.Image)


def test_blur_on_pil_and_tensor_agree_roughly(pil_image):
    pil_out = np.asarray(RandomGaussianBlur((1.0, 1.0), p=1.0)(pil_image)).astype(np.float32)
    x = v2.functional.pil_to_tensor(pil_image)
    tensor_out = RandomGaussianBlur((1.0, 1.0), p=1.0)(x).permute(1, 2, 0).numpy().astype(np.float32)
    inner = (slice(4, -4), slice(4, -4))
    # PIL approximates the Gaussian with box blurs; both smooth the noise about equally.
    assert np.abs(pil_out[inner] - tensor_out[inner]).mean() < 4
    assert np.asarray(pil_image, np.float32)[inner].std() > 2 * pil_out[inner].std()


def test_blur_probability(pil_image):
    torch.manual_seed(0)
    blur = RandomGaussianBlur(p=0.3)
    applied = np.mean([blur.make_params([pil_image])["sigma"] is not None for _ in range(2000)])
    assert 0.26 < applied < 0.34
    assert RandomGaussianBlur(p=0.0)(pil_image) is pil_image


@pytest.mark.parametrize("kwargs", [{"sigma": (0.0, 1.0)}, {"sigma": (2.0, 1.0)}, {"p": 1.5}])
def test_blur_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RandomGaussianBlur(**kwargs)


def test_solarize_threshold_is_relative_to_the_dtype(pil_image):
    solarize = RandomSolarize(0.5, p=1.0)
    x = v2.functional.pil_to_tensor(pil_image)
    expected = torch.where(x >= 128, 255 - x, x)
    torch.testing.assert_close(solarize(x), expected)
    torch.testing.assert_close(v2.functional.pil_to_tensor(solarize(pil_image)), expected)
    torch.testing.assert_close(solarize(x.float() / 255), expected.float() / 255)
    assert RandomSolarize(0.5, p=0.0)(x) is x


@pytest.mark.parametrize("kind", ["pil", "uint8", "float", "tv_image"])
def test_presets_give_normalized_float_views_of_the_same_size(pil_image, kind):
    image = as_inputs(pil_image)[kind]
    transforms = [moco_v2_view_transform(None), *byol_view_transforms(None)]
    for transform in transforms:
        out = transform(image)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (3, 48, 64)
        # Normalized: values of [0, 1] images lie within the mapped range.
        lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert (out >= lo[:, None, None] - 1e-4).all() and (out <= hi[:, None, None] + 1e-4).all()


def test_pil_and_tensor_inputs_give_the_same_views_without_random_steps(pil_image):
    transform = moco_v2_view_transform(None, blur_prob=0.0)
    for step in transform.transforms[:4]:
        step.p = 0.0  # jitter, grayscale, blur and flip off: only the conversion and normalization remain
    x = v2.functional.pil_to_tensor(pil_image)
    torch.testing.assert_close(transform(pil_image), transform(x))
    torch.testing.assert_close(transform(pil_image), transform(x.float() / 255))


def test_moco_preset_is_random_and_follows_the_torch_seed(pil_image):
    transform = moco_v2_view_transform()
    torch.manual_seed(1)
    a = [transform(pil_image) for _ in range(5)]
    torch.manual_seed(1)
    b = [transform(pil_image) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(a[0], x) for x in a[1:])


def test_byol_views_are_asymmetric(pil_image):
    view1, view2 = byol_view_transforms()
    blur1, blur2 = (next(t for t in v.transforms if isinstance(t, RandomGaussianBlur)) for v in (view1, view2))
    sol1, sol2 = (next(t for t in v.transforms if isinstance(t, RandomSolarize)) for v in (view1, view2))
    assert (blur1.p, blur2.p, sol1.p, sol2.p) == (1.0, 0.1, 0.0, 0.2)
    jitter = next(t for t in view1.transforms if isinstance(t, v2.RandomApply)).transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.6, 1.4),
        (0.8, 1.2),
        (-0.1, 0.1),
    )


@pytest.mark.parametrize("kind", ["pil", "uint8"])
def test_presets_give_views_of_size(pil_image, kind):
    image = as_inputs(pil_image)[kind]
    for transform in [moco_v2_view_transform(32), *byol_view_transforms(32)]:
        assert transform(image).shape == (3, 32, 32)


def test_size_step_leaves_views_of_that_size_alone(pil_image):
    resize = moco_v2_view_transform(64).transforms[0]
    sized = pil_image.resize((64, 64))
    assert resize(sized) is sized
    x = v2.functional.pil_to_tensor(sized)
    assert resize(x) is x
