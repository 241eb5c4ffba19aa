"""Self-supervised methods (MoCo-v2, BYOL, DenseCL) with projection heads routed by view kind.

Each method is an :class:`~objcrop.ssl.base.SSLMethod` (an ``nn.Module`` holding its networks and loss).
The trainer calls ``loss = model(batch)["loss"]``, steps the optimizer over the parameters that require
grad, then ``model.after_optimizer_step(step, total_steps)`` for the momentum/EMA update.
"""

from objcrop.ssl.backbones import BACKBONES, build_backbone, convert_sync_batchnorm
from objcrop.ssl.base import SSLMethod, build_method
from objcrop.ssl.byol import BYOL
from objcrop.ssl.densecl import DenseCL
from objcrop.ssl.heads import DEFAULT_KIND_TO_HEAD, ConvMLPHead, KindRoutedHead, MLPHead, ViewEncoder
from objcrop.ssl.lars import LARS
from objcrop.ssl.moco import KeyQueue, MoCoV2
from objcrop.ssl.reference import reference_moco_v2_step
from objcrop.ssl.schedules import byol_tau, scaled_lr, warmup_cosine, warmup_cosine_lambda

__all__ = [
    "BACKBONES",
    "BYOL",
    "DEFAULT_KIND_TO_HEAD",
    "LARS",
    "ConvMLPHead",
    "DenseCL",
    "KeyQueue",
    "KindRoutedHead",
    "MLPHead",
    "MoCoV2",
    "SSLMethod",
    "ViewEncoder",
    "build_backbone",
    "build_method",
    "byol_tau",
    "convert_sync_batchnorm",
    "reference_moco_v2_step",
    "scaled_lr",
    "warmup_cosine",
    "warmup_cosine_lambda",
]
