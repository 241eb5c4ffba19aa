"""Proposal backends from OpenCV contrib: BING objectness (``cv2.saliency``), selective search and
EdgeBoxes (``cv2.ximgproc``).

Each backend is a proposer, ``proposer(image HxWx3 uint8 RGB) -> (boxes float32 [n, 4] xyxy,
scores float32 [n])``, best first. OpenCV objects cannot be pickled, so each backend creates its
OpenCV object on its first call, in the process that calls it, and leaves it out of its pickled
state: the proposers can be sent to worker processes.

OpenCV parallelises inside some of these calls. With several worker processes, call
``cv2.setNumThreads(1)`` in each worker (objcrop's builder does); that is the caller's business.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "BING_COLOUR_SPACES",
    "EDGE_MODEL_URL",
    "EdgeBoxes",
    "OpenCVBing",
    "SelectiveSearch",
    "bing_blocks",
    "rank_scores",
]

BING_COLOUR_SPACES = ("MAXBGR", "HSV", "I")
_BING_VALUE_STEPS = (1, 3, 5)  # OpenCV's objectness "value" of the i-th box of each colour space is (i + 300) * step
EDGE_MODEL_URL = "https://github.com/opencv/opencv_extra/raw/4.x/testdata/cv/ximgproc/model.yml.gz"
_CONTRIB = "opencv-contrib-python-headless"


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:  # no C library reachable this way (Windows): nothing to flush or seed
        return None


def _contrib_cv2(module: str, backend: str):
    """Imports cv2 and checks that it has the contrib module ``cv2.<module>``."""
    from objcrop.proposals.backends import MissingDependencyError, require

    cv2 = require("cv2", backend, _CONTRIB)
    if not hasattr(cv2, module):
        raise MissingDependencyError(
            f"proposal backend {backend!r} needs cv2.{module}, which only OpenCV contrib has (cv2 {cv2.__version__} "
            f"lacks it); install it with: pip uninstall opencv-python opencv-python-headless && pip install {_CONTRIB}"
        )
    return cv2


def rank_scores(n: int) -> np.ndarray:
    """Scores ``1 / (1 + rank)``, strictly decreasing: for backends that give an order but no score."""
    return (1.0 / np.arange(1, n + 1, dtype=np.float64)).astype(np.float32)


def _xywh_to_xyxy(rects, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    r = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    return (np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1) * np.float32([sx, sy, sx, sy])).astype(np.float32)


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return image


@contextlib.contextmanager
def _stdout_to_devnull():
    """Sends what C code writes to file descriptor 1 to /dev/null meanwhile.

    OpenCV's BING ``printf``s a timing line per colour space on every call. C buffers stdout when it
    is not a terminal, so the buffer is flushed while fd 1 still points at /dev/null; otherwise the
    lines would appear later, wherever stdout then goes. Not thread-safe: another thread's writes to
    fd 1 meanwhile are lost too (stderr stays open, so errors still show).
    """
    libc = _libc()
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        if libc is not None:
            libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def bing_blocks(values) -> list[int]:
    """Sizes of the colour-space blocks (MAXBGR, HSV, I) of OpenCV BING's output.

    ``computeSaliency`` returns the boxes of the three colour spaces one block after the other, each
    block best first, and ``getobjectnessValues()`` gives the i-th box of colour space ``c`` the value
    ``(i + 300) * (1, 3, 5)[c]``: a rank, not a score. A value can be both the next box of a block
    and the first of the next block (box 600 of MAXBGR has the value 900 = 300 * 3), so both splits
    are tried. When both fit (MAXBGR 601 boxes and HSV 0 give the values of MAXBGR 600 and HSV 1),
    the earlier boundary wins: at most that one box is put in the wrong colour space.

    Raises:
        ValueError: ``values`` do not follow that pattern (another OpenCV version?).
    """
    v = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64).reshape(-1)

    def split(start: int, c: int) -> list[int] | None:
        if c == len(_BING_VALUE_STEPS):
            return [] if start == len(v) else None
        rest = v[start:]
        match = rest == (np.arange(len(rest)) + 300) * _BING_VALUE_STEPS[c]
        n = len(rest) if match.all() else int(np.argmin(match))
        for size in (n - 1, n):
            tail = split(start + size, c + 1) if size >= 0 else None
            if tail is not None:
                return [size, *tail]
        return None

    sizes = split(0, 0)
    if sizes is None:
        raise ValueError(
            f"OpenCV BING returned objectness values {v[:5].tolist()}... that are not the three rank blocks "
            "this wrapper knows (cv2.saliency changed?); its box order cannot be trusted"
        )
    return sizes


def _first_occurrences(boxes: np.ndarray) -> np.ndarray:
    """Sorted indices of the first occurrence of every distinct row of an int ``[n, 4]`` array."""
    if len(boxes) and boxes.min() >= 0 and boxes.max() < 1 << 16:  # one uint64 key per row: 20x faster
        keys = boxes.astype(np.uint64) << np.uint64([48, 32, 16, 0])
        _, first = np.unique(np.bitwise_or.reduce(keys, axis=1), return_index=True)
    else:
        _, first = np.unique(boxes, axis=0, return_index=True)
    return np.sort(first)


class OpenCVBing:
    """BING objectness (Cheng et al., CVPR 2014) through ``cv2.saliency.ObjectnessBING``.

    OpenCV runs the three trained colour-space models (MAXBGR, HSV, I) and returns their boxes as
    three blocks one after the other, each best first (its objectness "values" are ranks that grow
    as boxes get worse, not scores). We keep that order and drop exact duplicates of earlier boxes
    (about a quarter of them). On coco128 at IoU 0.5, the criterion of the BING paper, this block
    order beats interleaving the blocks round robin by rank (recall@10/100/1000: 0.115/0.283/0.574
    against 0.103/0.242/0.525; bootstrap 95% intervals of the differences over images exclude 0),
    since the colour spaces' top boxes are near copies of one another. At IoU 0.7 the interleaved
    order is better (0.038/0.074/0.147 against 0.031/0.067/0.105): ``order="interleave"``.

    The wrapper also converts our RGB to the BGR that BING's HSV and intensity models expect,
    converts OpenCV's 1-based inclusive corners to pixel-edge xyxy, silences the timing line that
    OpenCV prints on every call and sends the box file it writes on every call to a temporary folder
    that is removed. Scores are :func:`rank_scores` (OpenCV exposes no objectness score).

    Args:
        model: Folder of the trained model files ``ObjNessB2W8{MAXBGR,HSV,I}.{wS1,wS2,idx}.yml.gz``
            (opencv_contrib's ``modules/saliency/samples/ObjectnessTrainedModel``).
        topk: Boxes returned per image at most (``None``: all, about 8000 on a 640x480 image).
        colour_spaces: Blocks to keep, a subset of ``("MAXBGR", "HSV", "I")``, in the order given.
            OpenCV always computes all three.
        order: ``"blocks"`` (OpenCV's order) or ``"interleave"`` (round robin over the blocks by rank).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        topk: int | None = 1000,
        colour_spaces: Sequence[str] = BING_COLOUR_SPACES,
        order: str = "blocks",
    ) -> None:
        if model is None:
            raise ValueError(
                "opencv-bing needs the folder of its trained model files (--model DIR): "
                "ObjectnessTrainedModel from opencv_contrib's modules/saliency/samples"
            )
        self.model = Path(model)
        if not self.model.is_dir():
            raise FileNotFoundError(f"BING model folder not found: {self.model}")
        missing = [
            name
            for space in BING_COLOUR_SPACES
            for name in (f"ObjNessB2W8{space}.{part}.yml.gz" for part in ("wS1", "wS2", "idx"))
            if not (self.model / name).is_file()
        ]
        if missing:
            raise FileNotFoundError(f"BING model folder {self.model} lacks {', '.join(missing)}")
        unknown = [c for c in colour_spaces if c not in BING_COLOUR_SPACES]
        if unknown or not colour_spaces:
            raise ValueError(f"colour_spaces must be a non-empty subset of {BING_COLOUR_SPACES}, got {colour_spaces}")
        if order not in ("blocks", "interleave"):
            raise ValueError(f"order must be 'blocks' or 'interleave', got {order!r}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or None, got {topk}")
        _contrib_cv2("saliency", "opencv-bing")
        self.topk = topk
        self.colour_spaces = tuple(colour_spaces)
        self.order = order
        self._bing = None

    def __repr__(self) -> str:
        return (
            f"OpenCVBing(model={str(self.model)!r}, topk={self.topk}, colour_spaces={self.colour_spaces}, "
            f"order={self.order!r})"
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bing": None}

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """OpenCV's output for an RGB image: int32 ``[n, 4]`` boxes (1-based inclusive corners) and
        their float32 objectness values, in the order OpenCV returns them."""
        bgr = np.ascontiguousarray(_check_image(image)[:, :, ::-1])
        if self._bing is None:
            cv2 = _contrib_cv2("saliency", "opencv-bing")
            self._bing = cv2.saliency.ObjectnessBING_create()
            self._bing.setTrainingPath(str(self.model))
        with tempfile.TemporaryDirectory(prefix="objcrop-bing-") as tmp, _stdout_to_devnull():
            self._bing.setBBResDir(tmp)  # it writes <dir>/BBoxesB2W8I/bb.txt on every call
            ok, boxes = self._bing.computeSaliency(bgr)
            values = np.asarray(self._bing.getobjectnessValues(), dtype=np.float32)
        if not ok or boxes is None:
            return np.zeros((0, 4), np.int32), np.zeros(0, np.float32)
        return np.asarray(boxes, dtype=np.int32).reshape(-1, 4), values

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(boxes float32 [n, 4] xyxy, scores float32 [n])``, best first."""
        return self.from_raw(*self.raw(image))

    def from_raw(self, raw: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Our boxes and scores from OpenCV's output (:meth:`raw`): blocks kept and ordered, exact
        duplicates dropped, corners converted, ``topk`` applied."""
        raw = np.asarray(raw, dtype=np.int32).reshape(-1, 4)
        if len(raw) != len(values):
            raise ValueError(f"OpenCV BING returned {len(raw)} boxes but {len(values)} values")
        starts = np.concatenate([[0], np.cumsum(bing_blocks(values))])
        blocks = {space: raw[starts[c] : starts[c + 1]] for c, space in enumerate(BING_COLOUR_SPACES)}
        kept = [blocks[space] for space in self.colour_spaces]
        if self.order == "interleave":
            rank = np.concatenate([np.arange(len(b)) for b in kept])
            block = np.concatenate([np.full(len(b), c) for c, b in enumerate(kept)])
            boxes = np.concatenate(kept)[np.lexsort((block, rank))]
        else:
            boxes = np.concatenate(kept)
        boxes = boxes[_first_occurrences(boxes)][: self.topk]
        xyxy = boxes.astype(np.float32) - np.float32([1, 1, 0, 0])
        return xyxy, rank_scores(len(xyxy))


class SelectiveSearch:
    """Selective search (Uijlings et al., IJCV 2013) through ``cv2.ximgproc.segmentation``.

    The image is shrunk so that its longer side is ``max_side`` (selective search costs seconds per
    image at full size), and the boxes are scaled back.

    OpenCV ranks the regions by ``rand() * level`` in increasing order, ``level`` counting merges
    from the initial segments up: the finest segments come first, the reverse of the paper, which
    puts regions high in the merge hierarchy first. ``order="coarse-first"`` (the default) reverses
    OpenCV's list. On coco128 (fast, 500 px) that lifts recall@1/10/100 at IoU 0.5 from
    0.005/0.029/0.264 to 0.050/0.118/0.278 and at IoU 0.7 from 0.003/0.012/0.124 to
    0.018/0.071/0.188, for a lower recall@1000 at IoU 0.5 (0.628 against 0.663); object-aware
    cropping uses the first few proposals. ``order="opencv"`` keeps OpenCV's order.

    ``rand()`` is the C library's process-wide generator; we seed it with ``seed`` before every
    image, so an image's proposals do not depend on which images the process handled before. Scores
    are :func:`rank_scores`.

    Args:
        mode: ``"fast"`` or ``"quality"`` (OpenCV's two strategy sets).
        max_side: Longer side the image is shrunk to before the search (``None``: full size).
        topk: Boxes returned per image at most (``None``: all).
        seed: Seed of the ranking.
        order: ``"coarse-first"`` or ``"opencv"``, see above.
    """

    def __init__(
        self,
        mode: str = "fast",
        max_side: int | None = 500,
        topk: int | None = None,
        seed: int = 0,
        order: str = "coarse-first",
    ) -> None:
        if mode not in ("fast", "quality"):
            raise ValueError(f"mode must be 'fast' or 'quality', got {mode!r}")
        if max_side is not None and max_side < 16:
            raise ValueError(f"max_side must be >= 16 or None, got {max_side}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or None, got {topk}")
        if order not in ("coarse-first", "opencv"):
            raise ValueError(f"order must be 'coarse-first' or 'opencv', got {order!r}")
        _contrib_cv2("ximgproc", "selective-search")
        self.mode = mode
        self.max_side = max_side
        self.topk = topk
        self.seed = int(seed)
        self.order = order
        self._search = None

    def __repr__(self) -> str:
        return (
            f"SelectiveSearch(mode={self.mode!r}, max_side={self.max_side}, topk={self.topk}, seed={self.seed}, "
            f"order={self.order!r})"
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_search": None}

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(boxes float32 [n, 4] xyxy, scores float32 [n])``, best first."""
        cv2 = _contrib_cv2("ximgproc", "selective-search")
        height, width = _check_image(image).shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        if self.max_side is not None and max(width, height) > self.max_side:
            f = self.max_side / max(width, height)
            bgr = cv2.resize(bgr, (max(1, round(width * f)), max(1, round(height * f))), interpolation=cv2.INTER_AREA)
        if self._search is None:
            self._search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        self._search.setBaseImage(bgr)
        if self.mode == "fast":
            self._search.switchToSelectiveSearchFast()
        else:
            self._search.switchToSelectiveSearchQuality()
        libc = _libc()
        if libc is not None:
            libc.srand(ctypes.c_uint(self.seed))
        rects = self._search.process()
        self._search.clearImages()
        if self.order == "coarse-first":
            rects = rects[::-1]
        boxes = _xywh_to_xyxy(rects, width / bgr.shape[1], height / bgr.shape[0])[: self.topk]
        return boxes, rank_scores(len(boxes))


class EdgeBoxes:
    """EdgeBoxes (Zitnick and Dollar, ECCV 2014) through ``cv2.ximgproc``: structured-forest edges,
    their orientation and non-maximum suppression, then ``EdgeBoxes.getBoundingBoxes``.

    It needs a trained structured-edge model, which objcrop does not ship: download ``model.yml.gz``
    from opencv_extra (``testdata/cv/ximgproc/model.yml.gz``, :data:`EDGE_MODEL_URL`). The scores
    are EdgeBoxes' own (OpenCV >= 4.5.2), or :func:`rank_scores` with an older OpenCV.

    Args:
        model: Path of the structured-edge model (``model.yml.gz``).
        max_boxes: Boxes returned per image at most.
        alpha: Step size of the sliding-window search.
        beta: NMS threshold between boxes.
        eta: Adaptation rate of the NMS threshold.
        min_score: Boxes scoring lower are dropped.
        max_aspect_ratio: Largest box aspect ratio considered.
        min_box_area: Smallest box area considered, in pixels.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        max_boxes: int = 1000,
        alpha: float = 0.65,
        beta: float = 0.75,
        eta: float = 1.0,
        min_score: float = 0.01,
        max_aspect_ratio: float = 3.0,
        min_box_area: float = 1000.0,
    ) -> None:
        get_it = f"download model.yml.gz from opencv_extra's testdata/cv/ximgproc/ ({EDGE_MODEL_URL})"
        if model is None:
            raise ValueError(f"edgeboxes needs a structured-edge model (--model PATH): {get_it}")
        self.model = Path(model)
        if not self.model.is_file():
            raise FileNotFoundError(f"structured-edge model not found: {self.model}; {get_it}")
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        cv2 = _contrib_cv2("ximgproc", "edgeboxes")
        self.max_boxes = int(max_boxes)
        self.params = {
            "alpha": float(alpha),
            "beta": float(beta),
            "eta": float(eta),
            "minScore": float(min_score),
            "maxAspectRatio": float(max_aspect_ratio),
            "minBoxArea": float(min_box_area),
        }
        try:  # load it once here, so that a bad file fails now rather than in every worker
            self._edges = cv2.ximgproc.createStructuredEdgeDetection(str(self.model))
        except cv2.error as err:
            raise ValueError(f"{self.model} is not a structured-edge model ({err}); {get_it}") from None

    def __repr__(self) -> str:
        return f"EdgeBoxes(model={str(self.model)!r}, max_boxes={self.max_boxes}, {self.params})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_edges": None}

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(boxes float32 [n, 4] xyxy, scores float32 [n])``, best first."""
        cv2 = _contrib_cv2("ximgproc", "edgeboxes")
        if self._edges is None:
            self._edges = cv2.ximgproc.createStructuredEdgeDetection(str(self.model))
        # A fresh EdgeBoxes object per image (0.5 ms): a reused one keeps state from earlier calls, so the same
        # image gave 104, 109, then 100 boxes, and an image's proposals depended on what the worker saw before.
        finder = cv2.ximgproc.createEdgeBoxes(**self.params)
        finder.setMaxBoxes(self.max_boxes)
        rgb = _check_image(image).astype(np.float32) / 255.0  # structured edges want RGB in [0, 1]
        edges = self._edges.detectEdges(rgb)
        orientation = self._edges.computeOrientation(edges)
        edges = self._edges.edgesNms(edges, orientation)
        found = finder.getBoundingBoxes(edges, orientation)
        rects, scores = found if isinstance(found, tuple) and len(found) == 2 else (found, None)
        boxes = _xywh_to_xyxy(rects if len(rects) else np.zeros((0, 4)))
        if scores is None or len(scores) != len(boxes):
            return boxes, rank_scores(len(boxes))
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        order = np.argsort(-scores, kind="stable")
        return boxes[order], scores[order]
