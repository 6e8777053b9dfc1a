"""Paired folders: ``root/lq`` and ``root/gt`` holding images matched by file stem."""

from __future__ import annotations

import os
from pathlib import Path

from qualiteacher.data.io import list_images
from qualiteacher.data.records import ImageRecord, check_unique_ids, format_names


def read_paired(root: str | os.PathLike, lq_dir: str = "lq", gt_dir: str = "gt") -> list[ImageRecord]:
    """Records pairing ``root/lq/<stem>.*`` with ``root/gt/<stem>.*`` (suffixes may differ).

    Raises ``ValueError`` listing the unmatched names on each side (the first 10 and a count), or
    when a folder is empty; ``FileNotFoundError`` when a folder is missing.
    """
    root = Path(root)
    lq_root, gt_root = root / lq_dir, root / gt_dir
    for folder in (lq_root, gt_root):
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(
                f"paired layout needs the folder {folder}; sub-folders of {root}: "
                f"{', '.join(present) or 'none'}"
            )
    lq = _by_stem(lq_root)
    gt = _by_stem(gt_root)
    if not lq or not gt:
        empty = lq_root if not lq else gt_root
        raise ValueError(f"paired layout: no image files in {empty}")
    only_lq = sorted(set(lq) - set(gt))
    only_gt = sorted(set(gt) - set(lq))
    if only_lq or only_gt:
        raise ValueError(
            f"paired layout {root}: images without a partner (matched by file stem).\n"
            f"  {len(only_lq)} in {lq_dir}/ only: {format_names(only_lq) or '-'}\n"
            f"  {len(only_gt)} in {gt_dir}/ only: {format_names(only_gt) or '-'}"
        )
    return [ImageRecord(id=stem, lq=lq[stem], gt=gt[stem]) for stem in sorted(lq)]


def _by_stem(folder: Path) -> dict[str, Path]:
    records = [ImageRecord(id=p.stem, lq=p) for p in list_images(folder)]
    return {r.id: r.lq for r in check_unique_ids(records, folder)}
