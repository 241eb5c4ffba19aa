"""View-pair policies (geometry), the view-pair transform (pixels) and augmentation presets."""

from objcrop.crops.policies import KIND_CODES, POLICIES, VIEW_KINDS, ViewPair, ViewPairPolicy, make_policy

__all__ = ["KIND_CODES", "POLICIES", "VIEW_KINDS", "ViewPair", "ViewPairPolicy", "make_policy"]
