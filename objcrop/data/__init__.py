"""Dataset readers, image decoding and synthetic scenes. Everything produces :class:`Records`."""

from objcrop.data.coco import read_coco
from objcrop.data.folder import read_folder
from objcrop.data.images import ImageReadError, image_size, load_image
from objcrop.data.openimages import OpenImagesSubset, openimages_subset, read_openimages
from objcrop.data.readers import FORMATS, load_records
from objcrop.data.records import Record, Records
from objcrop.data.voc import read_voc
from objcrop.data.yolo import read_yolo

__all__ = [
    "FORMATS",
    "ImageReadError",
    "OpenImagesSubset",
    "Record",
    "Records",
    "image_size",
    "load_image",
    "load_records",
    "openimages_subset",
    "read_coco",
    "read_folder",
    "read_openimages",
    "read_voc",
    "read_yolo",
]
