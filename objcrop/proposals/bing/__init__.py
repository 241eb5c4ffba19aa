"""BING objectness (Cheng et al., "BING: Binarized Normed Gradients for Objectness Estimation at 300fps",
CVPR 2014): trainable on any box-annotated dataset, a binarized detector with popcount kernels, and a reader
for OpenCV's trained models.

Layers: :mod:`.features` (window sizes, resized normed-gradient maps) -> :mod:`.model` (filters, sizes,
calibration) -> :mod:`.detect` (scoring, selection, :class:`BingProposer`) and :mod:`.train` (with
:mod:`.train_config` and the bounded sample draws of :mod:`.sampling`);
:mod:`.model_io` and :mod:`.opencv_model` read and write models; :mod:`.rescore` is an optional learned
second ranking of the best windows. The numba kernels live in ``_kernels``.
"""

from objcrop.proposals.bing.detect import BingProposer, detect
from objcrop.proposals.bing.features import COLOUR_SPACES, size_grid
from objcrop.proposals.bing.model import BingFilter, BingModel, binarize_weights
from objcrop.proposals.bing.model_io import check_model_path, load_any, load_model, save_model
from objcrop.proposals.bing.opencv_model import load_opencv_model
from objcrop.proposals.bing.rescore import Rescorer
from objcrop.proposals.bing.train import TrainConfig, train_bing

__all__ = [
    "COLOUR_SPACES",
    "BingFilter",
    "BingModel",
    "BingProposer",
    "Rescorer",
    "TrainConfig",
    "binarize_weights",
    "check_model_path",
    "detect",
    "load_any",
    "load_model",
    "load_opencv_model",
    "save_model",
    "size_grid",
    "train_bing",
]
