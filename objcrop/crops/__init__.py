"""View-pair policies (geometry), the view-pair transform (pixels) and augmentation presets."""

from objcrop.crops.augment import RandomGaussianBlur, RandomSolarize, byol_view_transforms, moco_v2_view_transform
from objcrop.crops.dataset import ObjectAwareDataset
from objcrop.crops.policies import KIND_CODES, POLICIES, VIEW_KINDS, ViewPair, ViewPairPolicy, make_policy
from objcrop.crops.transforms import ViewPairStats, ViewPairTransform, resized_crop

__all__ = [
    "KIND_CODES",
    "POLICIES",
    "VIEW_KINDS",
    "ObjectAwareDataset",
    "RandomGaussianBlur",
    "RandomSolarize",
    "ViewPair",
    "ViewPairPolicy",
    "ViewPairStats",
    "ViewPairTransform",
    "byol_view_transforms",
    "make_policy",
    "moco_v2_view_transform",
    "resized_crop",
]
