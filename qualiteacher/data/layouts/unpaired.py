"""Unpaired folder: a folder of images with no reference (real degraded or clean-only sets)."""

from __future__ import annotations

import os
from pathlib import Path

from qualiteacher.data.io import IMAGE_SUFFIXES, list_images
from qualiteacher.data.records import ImageRecord, check_unique_ids, relative_id


def read_unpaired(root: str | os.PathLike, recursive: bool = False) -> list[ImageRecord]:
    """Records of the images in ``root`` (sub-folders too if ``recursive``).

    id = relative path without suffix. Raises ``ValueError`` if the folder holds no image.
    """
    root = Path(root)
    paths = list_images(root, recursive=recursive)
    if not paths:
        raise ValueError(f"no image files ({' '.join(IMAGE_SUFFIXES)}) in {root}")
    return check_unique_ids([ImageRecord(id=relative_id(p, root), lq=p) for p in paths], root)
