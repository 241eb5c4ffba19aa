"""Reader for a plain folder of images, optionally in class sub-folders (ImageFolder convention)."""

from __future__ import annotations

import os

import numpy as np

from objcrop.data._common import list_images, read_sizes
from objcrop.data.records import Record, Records

__all__ = ["read_folder"]


def read_folder(images_dir: str | os.PathLike) -> Records:
    """Reads every image under ``images_dir`` (recursive, sorted by path), without boxes.

    When every image sits inside a sub-folder (``images_dir/<class>/.../x.jpg``), the top-level
    sub-folder names are the classes (sorted) and each image gets its folder as image-level label,
    as torchvision's ImageFolder does. When some image lies directly in ``images_dir`` there are
    no classes. Sizes come from the image headers; unreadable images are counted, logged, skipped.
    """
    keys = list_images(images_dir)
    if not keys:
        raise ValueError(f"{os.fspath(images_dir)}: no image files found")
    folders = [k.split("/", 1)[0] if "/" in k else None for k in keys]
    class_names = sorted(set(folders)) if all(f is not None for f in folders) else []
    index = {name: i for i, name in enumerate(class_names)}
    ok, widths, heights = read_sizes(images_dir, keys, "image sizes")
    records = [
        Record(
            key,
            int(widths[i]),
            int(heights[i]),
            labels=np.array([index[folders[i]]] if class_names else [], np.int32),
            image_id=i,
        )
        for i, key in enumerate(keys)
        if ok[i]
    ]
    return Records.from_records(records, class_names, root=os.fspath(images_dir))
