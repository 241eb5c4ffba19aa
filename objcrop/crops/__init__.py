"""View-pair policies (geometry), the view-pair transform (pixels) and augmentation presets.

The policies are plain numpy. The pixel side imports torchvision, so it loads on first use:
``objcrop analyze coverage`` and the other geometry-only commands start without it.
"""

from importlib import import_module

from objcrop.crops.policies import KIND_CODES, POLICIES, VIEW_KINDS, ViewPair, ViewPairPolicy, make_policy

_LAZY = {
    "RandomGaussianBlur": "objcrop.crops.augment",
    "RandomSolarize": "objcrop.crops.augment",
    "byol_view_transforms": "objcrop.crops.augment",
    "moco_v2_view_transform": "objcrop.crops.augment",
    "ObjectAwareDataset": "objcrop.crops.dataset",
    "DeviceViewDataset": "objcrop.crops.device_dataset",
    "DeviceViewMaker": "objcrop.crops.device_views",
    "ViewPairStats": "objcrop.crops.transforms",
    "ViewPairTransform": "objcrop.crops.transforms",
    "resized_crop": "objcrop.crops.transforms",
}

__all__ = ["KIND_CODES", "POLICIES", "VIEW_KINDS", "ViewPair", "ViewPairPolicy", "make_policy", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'objcrop.crops' has no attribute {name!r}")
