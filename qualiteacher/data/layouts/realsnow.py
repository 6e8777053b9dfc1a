"""RealSnow10K (real snowy images): a flat folder, possibly split into sub-folders (``test/``...)."""

from __future__ import annotations

import os
from pathlib import Path

from qualiteacher.data.io import list_images
from qualiteacher.data.records import ImageRecord, check_unique_ids, relative_id


def read_realsnow(root: str | os.PathLike, split: str | None = None) -> list[ImageRecord]:
    """Records of the images directly in ``root``, or in ``root/<split>`` when ``split`` is given.

    id = path relative to ``root`` without suffix (``test/0001`` for a split). When ``root`` holds
    no image but sub-folders, the error lists the sub-folders to choose from as ``split``.
    """
    root = Path(root)
    folder = root / split if split else root
    if split and not folder.is_dir():
        raise FileNotFoundError(f"RealSnow split folder does not exist: {folder}{_choices(root)}")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"RealSnow: no image files in {folder}{_choices(root) if not split else ''}")
    return check_unique_ids(
        [ImageRecord(id=relative_id(p, root), lq=p, meta={"split": split or ""}) for p in paths], folder
    )


def _choices(root: Path) -> str:
    subs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return f"; sub-folders to pass as split: {', '.join(subs)}" if subs else ""
