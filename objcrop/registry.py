"""The extension points of objcrop: one table each for methods, policies, backends, formats and presets.

Everything that lists names is derived from these tables: the config's choices
(:data:`objcrop.ssl.config.CHOICES`), the command line's ``choices``, the README's lists (checked by
``tests/test_registry.py``) and the tests parametrised over each extension point. Adding a method, a
policy, a backend, a format or a preset is its code plus one line here (a method also wants a YAML
file in ``configs/``).

The tables hold ``"module:attribute"`` strings, imported on first use, so that reading a name
(``objcrop --help``, validating a config) imports neither torch nor any backend's dependency. This file
imports nothing from objcrop: every layer may read it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AUGMENT_ON",
    "AUGMENTS",
    "BACKENDS",
    "FORMATS",
    "METHODS",
    "POLICIES",
    "DatasetFormat",
    "Registry",
    "UnknownNameError",
    "import_target",
]

_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UnknownNameError(KeyError, ValueError):
    """A name that its registry does not hold.

    A ``KeyError`` for mapping code and a ``ValueError`` for the command line (exit code 2).
    """

    def __str__(self) -> str:
        """The message itself, not its ``repr`` as ``KeyError`` would print it."""
        return str(self.args[0]) if self.args else ""


def import_target(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names (the attribute may be dotted)."""
    module, _, attribute = target.partition(":")
    value = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


class Registry(MutableMapping):
    """Names -> entries of one extension point, in the order they were registered.

    A string entry is a ``"module:attribute"`` target, imported each time it is read (``registry[name]``);
    any other entry (a policy's region pair, a :class:`DatasetFormat`) is returned as it is.

    Args:
        kind: What the entries are, for messages (``"proposal backend"``).
        entries: The initial table.
    """

    def __init__(self, kind: str, entries: Mapping[str, Any]) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}
        for name, entry in entries.items():
            self.register(name, entry)

    def register(self, name: str, entry: Any) -> None:
        """Adds (or replaces) ``name``; a string entry must look like ``"module:attribute"``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if isinstance(entry, str) and not _TARGET.match(entry):
            raise ValueError(f"{self.kind} {name!r}: expected 'module:attribute', got {entry!r}")
        self._entries[name] = entry

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def target(self, name: str) -> Any:
        """The raw entry of ``name`` (the ``"module:attribute"`` string itself), nothing imported."""
        self._check(name)
        return self._entries[name]

    def _check(self, name: str) -> None:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}")

    def __getitem__(self, name: str) -> Any:
        """The entry of ``name``, its target imported now.

        Raises:
            UnknownNameError: ``name`` is not registered (the message lists the registered names).
        """
        entry = self.target(name)
        return import_target(entry) if isinstance(entry, str) else entry

    def __setitem__(self, name: str, entry: Any) -> None:
        """Same as :meth:`register`."""
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:
        """Removes ``name``."""
        self._check(name)
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered (nothing is imported)."""
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The names, in registration order."""
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        """How many names are registered."""
        return len(self._entries)

    def __repr__(self) -> str:
        """``Registry('proposal backend', [names])``."""
        return f"Registry({self.kind!r}, {list(self._entries)})"


@dataclass(frozen=True)
class DatasetFormat:
    """How :func:`objcrop.data.readers.load_records` calls a format's reader.

    The reader is called as ``reader(annotations, images, **options)``, or ``reader(images, **options)``
    when the format reads no ``--annotations``; ``options`` holds only the optional files the user gave.

    Attributes:
        reader: ``"module:function"`` of the reader, returning :class:`~objcrop.data.records.Records`.
        annotations: What ``--annotations`` is for this format (named in messages); ``None``: it takes none.
        options: Optional files the format takes (``"labels_csv"``, ``"classes_csv"``) -> the reader's keyword.
    """

    reader: str
    annotations: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Checks the reader target's shape (nothing is imported)."""
        if not _TARGET.match(self.reader):
            raise ValueError(f"reader: expected 'module:function', got {self.reader!r}")


# ---------------------------------------------------------------------------------------------- the tables

#: Self-supervised methods (``method.name``): subclasses of :class:`objcrop.ssl.base.SSLMethod`.
METHODS = Registry(
    "SSL method",
    {
        "moco": "objcrop.ssl.moco:MoCoV2",
        "byol": "objcrop.ssl.byol:BYOL",
        "densecl": "objcrop.ssl.densecl:DenseCL",
    },
)

#: View-pair policies (``crops.policy``, ``--policy``): name -> (region of view 1, region of view 2).
#: ``object`` is a proposal, ``dilated`` and ``shifted`` are derived from that same proposal and ``scene`` is
#: the whole image (see :class:`objcrop.crops.policies.ViewPairPolicy`, which knows the region kinds).
POLICIES = Registry(
    "view-pair policy",
    {
        "scene-scene": ("scene", "scene"),
        "obj-scene": ("object", "scene"),
        "obj-obj-dilate": ("object", "dilated"),
        "obj-obj-shift": ("object", "shifted"),
        "dilate-dilate": ("dilated", "dilated"),
        "obj-obj": ("object", "object"),
    },
)

#: Proposal backends (``objcrop propose --backend``): factories ``factory(**options) -> proposer``, where
#: ``proposer(image HxWx3 uint8 RGB) -> (boxes float32 [n, 4] xyxy, scores float32 [n])``, best first, and
#: picklable (worker processes get a copy). ``gt`` reads annotations instead of pixels and is no entry here
#: (see :mod:`objcrop.proposals.backends`).
BACKENDS = Registry(
    "proposal backend",
    {
        "bing": "objcrop.proposals.bing:BingProposer",
        "opencv-bing": "objcrop.proposals.opencv_backends:OpenCVBing",
        "selective-search": "objcrop.proposals.opencv_backends:SelectiveSearch",
        "edgeboxes": "objcrop.proposals.opencv_backends:EdgeBoxes",
        "random": "objcrop.proposals.random_boxes:RandomBoxProposer",
    },
)

#: Dataset formats (``data.format``, ``--format``).
FORMATS = Registry(
    "dataset format",
    {
        "coco": DatasetFormat("objcrop.data.coco:read_coco", "the instances JSON"),
        "voc": DatasetFormat("objcrop.data.voc:read_voc", "the Annotations folder or an ImageSets list file"),
        "openimages": DatasetFormat(
            "objcrop.data.openimages:read_openimages",
            "the boxes CSV",
            {"labels_csv": "labels_csv", "classes_csv": "classes_csv"},
        ),
        "yolo": DatasetFormat("objcrop.data.yolo:read_yolo", "the labels folder", {"classes_csv": "class_names"}),
        "folder": DatasetFormat("objcrop.data.folder:read_folder"),
        "webdataset": DatasetFormat("objcrop.data.webdataset:read_webdataset"),  # boxes in each sample's json
    },
)

#: Augmentation presets of the loader path (``crops.augment``): ``factory(size) -> transform`` of every view,
#: or a pair of transforms (view 1, view 2) for asymmetric methods. The device path
#: (``crops.augment_on: device``) draws the same augmentations from
#: :data:`objcrop.crops.device_views.AUGMENT_PRESETS`, which holds a twin of each (a test checks this).
AUGMENTS = Registry(
    "augmentation preset",
    {
        "moco-v2": "objcrop.crops.augment:moco_v2_view_transform",
        "byol": "objcrop.crops.augment:byol_view_transforms",
    },
)

#: Where the views are made (``crops.augment_on``): ``loader`` workers (PIL, per sample), the training
#: ``device`` (batched), or ``auto`` (the device when training on CUDA, the loader otherwise).
AUGMENT_ON = ("auto", "loader", "device")
