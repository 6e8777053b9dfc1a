"""Data: image I/O, data-set readers (layouts) and the Lightning data module.

The data-module names are imported on first use, so that ``qualiteacher.data.io`` and the readers
stay importable without loading Lightning and albumentations.
"""

from __future__ import annotations

import importlib

from qualiteacher.data.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    SkipLog,
    get_skip_log,
    list_images,
    pad_to_size,
    read_image,
    to_tensor,
    write_image,
)
from qualiteacher.data.layouts import (
    EXDARK_CLASSES,
    LAYOUTS,
    RTTS_CLASSES,
    list_layouts,
    read_exdark,
    read_layout,
    read_paired,
    read_real3000,
    read_realsnow,
    read_rtts,
    read_unpaired,
)
from qualiteacher.data.records import AnnotationError, ImageRecord

_LAZY = {  # name -> module (albumentations, cv2 and Lightning load on first use)
    **dict.fromkeys(("CropDataset", "EvalDataset", "ImageFolderDataset", "seed_worker"), "qualiteacher.data.datasets"),
    **dict.fromkeys(("RestorationDataModule", "read_quality_table"), "qualiteacher.data.datamodule"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qualiteacher.data' has no attribute {name!r}")


__all__ = [
    "EXDARK_CLASSES",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "RTTS_CLASSES",
    "AnnotationError",
    "CropDataset",
    "EvalDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "ImageRecord",
    "RestorationDataModule",
    "SkipLog",
    "get_skip_log",
    "list_images",
    "list_layouts",
    "pad_to_size",
    "read_exdark",
    "read_image",
    "read_layout",
    "read_paired",
    "read_quality_table",
    "read_real3000",
    "read_realsnow",
    "read_rtts",
    "read_unpaired",
    "seed_worker",
    "to_tensor",
    "write_image",
]
