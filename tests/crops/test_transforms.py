import logging

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.datasets import VisionDataset
from torchvision.transforms import v2

from objcrop.crops.policies import POLICIES, ViewPairPolicy
from objcrop.crops.transforms import ViewPairTransform, image_size, resized_crop

RED = (200, 30, 30)
BLOCK = np.array([[16, 8, 40, 32]], np.float32)  # a 24 x 24 red object on a gray 64 x 48 image


def identity(x):
    return x


def to_array(view) -> np.ndarray:
    if isinstance(view, PIL.Image.Image):
        return np.asarray(view)
    return view.permute(1, 2, 0).numpy()


@pytest.fixture
def scene():
    pixels = np.full((48, 64, 3), 90, np.uint8)
    pixels[8:32, 16:40] = RED
    return PIL.Image.fromarray(pixels)


@pytest.fixture
def gradient():
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def inputs(image):
    tensor = v2.functional.pil_to_tensor(image)
    return {"pil": image, "tensor": tensor, "tv_image": tv_tensors.Image(tensor)}


def test_image_size_of_pil_and_tensors(scene):
    for image in inputs(scene).values():
        assert image_size(image) == (64, 48)
    with pytest.raises(TypeError, match="PIL image"):
        image_size(np.zeros((48, 64, 3)))


@pytest.mark.parametrize("kind", ["pil", "tensor", "tv_image"])
def test_resized_crop_matches_torchvision_on_whole_pixel_boxes(gradient, kind):
    image = inputs(gradient)[kind]
    out = resized_crop(image, [8, 4, 40, 36], 16)
    expected = v2.functional.resized_crop(image, 4, 8, 32, 32, [16, 16], antialias=True)
    assert type(out) is type(expected)
    diff = np.abs(to_array(out).astype(int) - to_array(expected).astype(int))
    # PIL resamples the box from the full image, so its border pixels also see the pixels just
    # outside the box, which crop-then-resize cannot; inside they agree.
    assert diff[1:-1, 1:-1].max() <= 1 and diff.mean() < 0.5


def test_resized_crop_clamps_tensor_boxes_to_the_image(gradient):
    x = v2.functional.pil_to_tensor(gradient)
    out = resized_crop(x, [-5.0, 40.2, 70.0, 48.0], 8)
    expected = v2.functional.resized_crop(x, 40, 0, 8, 64, [8, 8], antialias=True)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kind", ["pil", "tensor", "tv_image"])
def test_object_views_show_the_object(scene, kind):
    policy = ViewPairPolicy("obj-obj", swap=False)  # the object is smaller than a scene crop: crop = object
    transform = ViewPairTransform(policy, size=12, view_transforms=identity, seed=0)
    views, kinds = transform(inputs(scene)[kind], BLOCK)
    assert kinds == ("object", "object")
    assert len(views) == 2
    for view in views:
        pixels = to_array(view)
        assert pixels.shape == (12, 12, 3)
        np.testing.assert_allclose(pixels[1:-1, 1:-1].reshape(-1, 3), np.broadcast_to(RED, (100, 3)), atol=1)


def test_pil_and_tensor_images_give_the_same_views_for_the_same_seed(gradient):
    policy = ViewPairPolicy("obj-obj-dilate", object_scale=(0.6, 1.0))
    proposals = np.array([[4, 4, 40, 36]], np.float32)
    views = {}
    for kind, image in inputs(gradient).items():
        transform = ViewPairTransform(policy, size=16, view_transforms=identity, seed=5)
        views[kind] = [to_array(v).astype(int) for v in transform(image, proposals)[0]]
    np.testing.assert_array_equal(views["tensor"], views["tv_image"])
    # Tensors are cut at whole pixels, PIL at the exact float box: close, not equal.
    assert np.abs(np.subtract(views["pil"], views["tensor"])).mean() < 6


def test_default_transform_gives_normalized_tensors_of_the_view_size(scene):
    for name in POLICIES:
        views, kinds = ViewPairTransform(ViewPairPolicy(name), size=32, seed=0)(scene, BLOCK)
        assert [v.shape for v in views] == [(3, 32, 32)] * 2
        assert all(v.dtype == torch.float32 for v in views)
        assert set(kinds) <= set(POLICIES[name])


def test_a_pair_of_view_transforms_applies_one_to_each_view(scene):
    def first(view):
        return ("first", view)

    def second(view):
        return ("second", view)

    transform = ViewPairTransform(ViewPairPolicy("obj-scene"), size=8, view_transforms=(first, second), seed=0)
    views, _ = transform(scene, BLOCK)
    assert [v[0] for v in views] == ["first", "second"]
    with pytest.raises(ValueError, match="pair"):
        ViewPairTransform(ViewPairPolicy(), view_transforms=(first, second, first))


def test_seed_makes_the_main_process_reproducible(gradient):
    def run(seed):
        transform = ViewPairTransform(ViewPairPolicy("obj-obj-shift"), size=8, view_transforms=identity, seed=seed)
        return [to_array(v) for _ in range(5) for v in transform(gradient, BLOCK)[0]]

    a, b, c = run(1), run(1), run(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_fallbacks_are_counted_and_logged_once_then_every_n(scene, caplog):
    transform = ViewPairTransform(ViewPairPolicy("obj-scene"), size=8, view_transforms=identity, seed=0, warn_every=4)
    no_proposals = np.zeros((0, 4), np.float32)
    with caplog.at_level(logging.WARNING, logger="objcrop.crops.transforms"):
        for _ in range(3):
            _, kinds = transform(scene, BLOCK)
            assert "object" in kinds
        for _ in range(9):
            _, kinds = transform(scene, no_proposals)
            assert kinds == ("scene", "scene")
    assert (transform.stats.samples, transform.stats.fallbacks) == (12, 9)
    assert transform.stats.fallback_rate == pytest.approx(0.75)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # fallbacks 1, 4 and 8
    assert "obj-scene" in messages[0] and "1 of 4" in messages[0]
    assert "8 of 11" in messages[-1]


class ProposalImages(VisionDataset):
    """A torchvision dataset whose samples are ``(image, proposals)``, transformed by ``transforms``."""

    def __init__(self, image, proposals, length, transforms=None):
        super().__init__(root=None, transforms=transforms)
        self.image, self.proposals, self.length = image, proposals, length

    def __getitem__(self, index):
        image, proposals = self.image, self.proposals
        if self.transforms is not None:
            image, proposals = self.transforms(image, proposals)
        return image, proposals

    def __len__(self):
        return self.length


def view_batches(dataset, workers, torch_seed):
    torch.manual_seed(torch_seed)
    loader = DataLoader(dataset, batch_size=4, num_workers=workers)
    return [batch for batch in loader]


def test_drops_into_a_torchvision_dataset_and_dataloader(scene):
    transform = ViewPairTransform(ViewPairPolicy("obj-scene"), size=16, seed=0)
    dataset = ProposalImages(scene, BLOCK, length=8, transforms=transform)
    batches = view_batches(dataset, workers=0, torch_seed=0)
    assert len(batches) == 2
    views, kinds = batches[0]
    assert [v.shape for v in views] == [(4, 3, 16, 16)] * 2
    assert sorted(kinds[0] + kinds[1]) == ["object"] * 4 + ["scene"] * 4


def test_workers_draw_different_crops_and_torch_seed_reproduces_them(gradient):
    transform = ViewPairTransform(ViewPairPolicy("obj-obj-shift"), size=8, view_transforms=v2.PILToTensor(), seed=0)
    dataset = ProposalImages(gradient, np.array([[10, 8, 50, 40]], np.float32), length=8, transforms=transform)
    a, b, c = (view_batches(dataset, workers=2, torch_seed=s) for s in (11, 11, 12))
    # Batches 0 and 1 come from workers 0 and 1 (same image, same proposals).
    assert not torch.equal(a[0][0][0], a[1][0][0])
    assert all(torch.equal(x[0][i], y[0][i]) for x, y in zip(a, b, strict=True) for i in range(2))
    assert not all(torch.equal(x[0][0], y[0][0]) for x, y in zip(a, c, strict=True))
    # The main-process generator is not touched by the workers.
    assert transform.stats.samples == 0
