"""The batched view maker: crop+resize against the loader path's PIL views (PSNR), each augmentation op
against torchvision's functional op, the presets against objcrop.crops.augment, and the parameter
distributions over many samples (MoCo-v2 and BYOL)."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from objcrop.crops.augment import RandomGaussianBlur, RandomSolarize, byol_view_transforms, moco_v2_view_transform
from objcrop.crops.decode import decode_image, pad_images
from objcrop.crops.device_views import (
    AUGMENT_PRESETS,
    PARAM_NAMES,
    DeviceViewMaker,
    ViewAugment,
    augment_views,
    crop_resize,
)
from objcrop.crops.policies import ViewPairPolicy
from objcrop.crops.transforms import resized_crop
from objcrop.data.images import load_image
from tests.conftest import SHARED_DATA, needs_shared_data

COCO = SHARED_DATA / "coco128" / "train2017"
P = {name: i for i, name in enumerate(PARAM_NAMES)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def pil_views(paths, crops, size) -> torch.Tensor:
    """The loader path's views of the same boxes (PIL's antialiased bilinear resize), view-major, in [0, 1]."""
    out = [
        torch.from_numpy(np.array(resized_crop(load_image(p), crops[b, v].tolist(), size))).permute(2, 0, 1)
        for v in range(crops.shape[1])
        for b, p in enumerate(paths)
    ]
    return torch.stack(out).float() / 255


def scene_crops(images, rng, scale=(0.02, 1.0)) -> torch.Tensor:
    """RandomResizedCrop boxes of 2-100 % of each image: from mild upscaling to strong downscaling."""
    policy = ViewPairPolicy("scene-scene", scene_scale=scale)
    empty = np.zeros((0, 4), np.float32)
    return torch.stack([torch.from_numpy(policy.sample(im.shape[2], im.shape[1], empty, rng).crops) for im in images])


@needs_shared_data("coco128/train2017")
@pytest.mark.parametrize("size", [224, 64])
def test_crop_resize_matches_pil_views_of_coco_images_above_30_db(size):
    """Measured on these 16 views: min 35.6 dB (mean 43.1) at 224 px, min 37.5 dB (mean 42.2) at 64 px."""
    paths = sorted(COCO.glob("*.jpg"))[:8]
    assert paths, COCO
    images = [decode_image(p) for p in paths]
    crops = scene_crops(images, np.random.default_rng(0))
    ours = crop_resize(pad_images(images), crops, size)
    reference = pil_views(paths, crops, size)
    values = [psnr(a, b) for a, b in zip(ours, reference, strict=True)]
    assert min(values) >= 30.0, values
    assert np.mean(values) >= 35.0, values


def test_crop_resize_matches_pil_on_smooth_synthetic_images_of_mixed_sizes(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for k, (h, w) in enumerate([(60, 90), (97, 71), (40, 40)]):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([128 + 100 * np.sin(xx / 5 + k), 128 + 100 * np.cos(yy / 4), (xx + yy) % 256], axis=2)
        PIL.Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    images = [decode_image(p) for p in paths]
    crops = scene_crops(images, rng, scale=(0.1, 1.0))
    ours = crop_resize(pad_images(images), crops, 16)
    reference = pil_views(paths, crops, 16)
    assert ours.shape == (6, 3, 16, 16) and ours.dtype == torch.float32
    assert min(psnr(a, b) for a, b in zip(ours, reference, strict=True)) >= 30.0


def test_crop_resize_does_not_read_the_padding_of_smaller_images():
    small = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    big = torch.full((3, 20, 20), 7, dtype=torch.uint8)
    crops = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 8.0, 8.0]], [[0.0, 0.0, 20.0, 20.0]] * 2])
    views = crop_resize(pad_images([small, big]), crops, 5)
    torch.testing.assert_close(views[[0, 2]], torch.full((2, 3, 5, 5), 100 / 255))
    torch.testing.assert_close(views[[1, 3]], torch.full((2, 3, 5, 5), 7 / 255))


def identity_row(**values) -> torch.Tensor:
    row = torch.zeros(len(PARAM_NAMES))
    row[[P["brightness"], P["contrast"], P["saturation"]]] = 1.0
    row[P["order0"] : P["order3"] + 1] = torch.arange(4.0)
    for name, value in values.items():
        row[P[name]] = value
    return row


@pytest.fixture
def views() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 6, 6, generator=g), size=24, mode="bilinear")
    return smooth.clamp(0, 1)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"brightness": 1.3}, lambda x: F.adjust_brightness(x, 1.3)),
        ({"contrast": 0.6}, lambda x: F.adjust_contrast(x, 0.6)),
        ({"saturation": 1.4}, lambda x: F.adjust_saturation(x, 1.4)),
        ({"hue": -0.08}, lambda x: F.adjust_hue(x, -0.08)),
        ({"grayscale": 1.0}, lambda x: F.rgb_to_grayscale(x, num_output_channels=3)),
        ({"sigma": 1.5}, lambda x: F.gaussian_blur(x, [11, 11], [1.5, 1.5])),
        ({"solarize": 1.0}, lambda x: F.solarize(x, 0.5)),
        ({"flip": 1.0}, F.horizontal_flip),
        (
            {"brightness": 1.2, "contrast": 0.7, "saturation": 0.8, "hue": 0.05, "order0": 3, "order1": 1,
             "order2": 0, "order3": 2},
            lambda x: F.adjust_saturation(F.adjust_brightness(F.adjust_contrast(F.adjust_hue(x, 0.05), 0.7), 1.2), 0.8),
        ),
    ],
)  # fmt: skip
def test_each_op_matches_torchvision_on_the_views_it_is_drawn_for(views, values, expected):
    params = torch.stack([identity_row(), identity_row(**values), identity_row()])
    out = augment_views(views.clone(), params)
    torch.testing.assert_close(out[1], expected(views[1]), atol=2e-3, rtol=0)
    torch.testing.assert_close(out[[0, 2]], views[[0, 2]])  # the other views are left alone


def test_blur_of_a_batch_uses_each_views_own_sigma(views):
    params = torch.stack([identity_row(sigma=0.5), identity_row(sigma=2.0), identity_row()])
    out = augment_views(views.clone(), params)
    # The batch kernel is 13 taps (for sigma 2); the loader's 5 for sigma 0.5 (2 * ceil(3 sigma) + 1) give the same.
    torch.testing.assert_close(out[0], F.gaussian_blur(views[0], [5, 5], [0.5, 0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], F.gaussian_blur(views[1], [13, 13], [2.0, 2.0]), atol=1e-5, rtol=0)


def loader_view_augment(compose: v2.Compose) -> ViewAugment:
    """The ViewAugment a loader-side preset of objcrop.crops.augment stands for, read from its transforms."""
    fields = {"solarize_p": 0.0, "blur_p": 0.0}
    for t in compose.transforms:
        if isinstance(t, v2.RandomApply):
            (jitter,) = t.transforms
            b, c, s, h = jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
            fields.update(jitter=(b[1] - 1, c[1] - 1, s[1] - 1, h[1]), jitter_p=t.p)
        elif isinstance(t, v2.RandomGrayscale):
            fields["grayscale_p"] = t.p
        elif isinstance(t, RandomGaussianBlur):
            fields.update(blur_sigma=t.sigma, blur_p=t.p)
        elif isinstance(t, RandomSolarize):
            fields.update(solarize_p=t.p, solarize_threshold=t.threshold)
        elif isinstance(t, v2.RandomHorizontalFlip):
            fields["flip_p"] = t.p
    return ViewAugment(**{k: tuple(round(x, 6) for x in v) if isinstance(v, tuple) else v for k, v in fields.items()})


def test_every_loader_preset_in_the_registry_has_a_device_twin():
    from objcrop import registry

    assert set(registry.AUGMENTS.names()) <= set(AUGMENT_PRESETS)


def test_presets_have_the_loader_presets_parameters():
    assert AUGMENT_PRESETS["moco-v2"].views == (loader_view_augment(moco_v2_view_transform()),) * 2
    assert AUGMENT_PRESETS["byol"].views == tuple(loader_view_augment(t) for t in byol_view_transforms())
    normalize = moco_v2_view_transform().transforms[-1]
    assert tuple(normalize.mean) == AUGMENT_PRESETS["moco-v2"].mean
    assert tuple(normalize.std) == AUGMENT_PRESETS["moco-v2"].std


def draws(preset: str, n: int = 10000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([AUGMENT_PRESETS[preset].draw(rng) for _ in range(n)])  # [n, 2, P]


def rate(column: np.ndarray) -> float:
    return float(np.mean(column))


def check_jitter(view: np.ndarray, strengths, p=0.8) -> None:
    jittered = view[:, P["hue"]] != 0
    assert abs(rate(jittered) - p) < 0.02
    for k, name in enumerate(("brightness", "contrast", "saturation")):
        f = view[jittered, P[name]]
        lo, hi = 1 - strengths[k], 1 + strengths[k]
        assert f.min() >= lo and f.max() <= hi and f.min() < lo + 0.01 and f.max() > hi - 0.01, name
        assert abs(f.mean() - 1.0) < 0.01, name  # uniform around 1
        assert (view[~jittered, P[name]] == 1).all()
    h = view[jittered, P["hue"]]
    assert h.min() >= -strengths[3] and h.max() <= strengths[3] and h.max() - h.min() > 2 * strengths[3] - 0.01
    orders = view[jittered][:, P["order0"] : P["order3"] + 1].astype(int)
    assert (np.sort(orders, axis=1) == np.arange(4)).all()  # a permutation of the four ops
    assert len({tuple(o) for o in orders}) == 24


def check_blur(view: np.ndarray, p: float) -> None:
    sigma = view[:, P["sigma"]]
    assert abs(rate(sigma > 0) - p) < 0.02
    if p > 0:
        s = sigma[sigma > 0]
        assert s.min() >= 0.1 and s.max() <= 2.0 and s.min() < 0.12 and s.max() > 1.98
        assert abs(s.mean() - 1.05) < 0.03


def test_moco_v2_parameter_distributions():
    d = draws("moco-v2")
    for view in (d[:, 0], d[:, 1]):
        check_jitter(view, (0.4, 0.4, 0.4, 0.1))
        assert abs(rate(view[:, P["grayscale"]]) - 0.2) < 0.015
        assert abs(rate(view[:, P["flip"]]) - 0.5) < 0.02
        check_blur(view, 0.5)
        assert rate(view[:, P["solarize"]]) == 0
    # The two views draw independently.
    assert abs(rate(d[:, 0, P["flip"]] * d[:, 1, P["flip"]]) - 0.25) < 0.02


def test_byol_asymmetric_parameter_distributions():
    d = draws("byol")
    first, second = d[:, 0], d[:, 1]
    for view in (first, second):
        check_jitter(view, (0.4, 0.4, 0.2, 0.1))
        assert abs(rate(view[:, P["grayscale"]]) - 0.2) < 0.015
        assert abs(rate(view[:, P["flip"]]) - 0.5) < 0.02
    check_blur(first, 1.0)
    check_blur(second, 0.1)
    assert rate(first[:, P["solarize"]]) == 0
    assert abs(rate(second[:, P["solarize"]]) - 0.2) < 0.015


def test_none_preset_draws_identities():
    d = draws("none", 200)
    assert (d[..., P["brightness"] : P["saturation"] + 1] == 1).all()
    assert (d[..., P["hue"]] == 0).all() and (d[..., P["grayscale"] :] == 0).all()


def test_augmentations_change_views_at_the_drawn_rates(views):
    """Over many views the ops the parameters ask for happen: grayscale views have equal channels."""
    rng = np.random.default_rng(3)
    params = torch.from_numpy(np.concatenate([AUGMENT_PRESETS["moco-v2"].draw(rng) for _ in range(40)]))
    x = views[torch.arange(80) % 3].clone()
    out = augment_views(x, params)
    gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert torch.equal(gray, params[:, P["grayscale"]] > 0)


def test_maker_returns_two_normalized_channels_last_batches_in_fp32_even_under_autocast():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 30, 40), dtype=torch.uint8, generator=g)
    crops = torch.tensor([[0.0, 0.0, 40.0, 30.0], [5.0, 5.0, 25.0, 20.0]]).expand(3, 2, 4).contiguous()
    rng = np.random.default_rng(0)
    params = torch.from_numpy(np.stack([AUGMENT_PRESETS["byol"].draw(rng) for _ in range(3)]))
    maker = DeviceViewMaker(16, "byol")
    views = maker(images, crops, params)
    assert [tuple(v.shape) for v in views] == [(3, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last) for v in views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = maker(images, crops, params)
    for a, b in zip(views, again, strict=True):
        torch.testing.assert_close(a, b)
    raw = maker(images, crops, None, normalize=False)
    mean = torch.tensor(AUGMENT_PRESETS["byol"].mean).view(1, 3, 1, 1)
    std = torch.tensor(AUGMENT_PRESETS["byol"].std).view(1, 3, 1, 1)
    unaugmented = DeviceViewMaker(16, "none")(images, crops, None)
    torch.testing.assert_close(unaugmented[0], (raw[0] - mean) / std)


@pytest.mark.parametrize(
    "kwargs", [{"blur_sigma": (0.0, 1.0)}, {"jitter": (0.4, 0.4, 0.4, 0.6)}, {"flip_p": 1.5}, {"grayscale_p": math.nan}]
)
def test_view_augment_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ViewAugment(**kwargs)


def test_maker_rejects_unknown_presets_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown augmentation preset 'simclr'"):
        DeviceViewMaker(16, "simclr")
    maker = DeviceViewMaker(8)
    images = torch.zeros(2, 3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"crops must be \[B, 2, 4\]"):
        maker(images, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="params must be"):
        maker(images, torch.tensor([[0.0, 0.0, 5.0, 5.0]]).expand(2, 2, 4), torch.zeros(2, 2, 3))
