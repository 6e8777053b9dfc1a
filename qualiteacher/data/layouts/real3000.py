"""Real3000 (real rainy images): a flat folder of numbered files ``1.png ... 3000.png``.

The published protocol tests on indices 1705-2004 inclusive (300 images) and trains on the rest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qualiteacher.data.io import list_images
from qualiteacher.data.records import ImageRecord, check_unique_ids, format_names

log = logging.getLogger(__name__)

TEST_FIRST, TEST_LAST = 1705, 2004
SPLITS = ("train", "test", "all")


def in_test_split(index: int) -> bool:
    """True for the Real3000 test indices 1705-2004."""
    return TEST_FIRST <= index <= TEST_LAST


def read_real3000(root: str | os.PathLike, split: str = "train") -> list[ImageRecord]:
    """Records of ``root/<n>.<suffix>`` for ``split`` in ``train`` / ``test`` / ``all``, by index.

    Files whose stem is not a number are reported (a warning) and ignored. ``meta`` holds
    ``index`` and ``split``. Raises ``ValueError`` when the split is empty.
    """
    if split not in SPLITS:
        raise ValueError(f"Real3000 split must be one of {', '.join(SPLITS)}; got {split!r}")
    root = Path(root)
    numbered: list[tuple[int, Path]] = []
    ignored: list[str] = []
    for p in list_images(root):
        if p.stem.isdigit():
            numbered.append((int(p.stem), p))
        else:
            ignored.append(p.name)
    if ignored:
        log.warning("Real3000 %s: ignoring %d file(s) without a numeric name: %s",
                    root, len(ignored), format_names(ignored))
    records = []
    for index, p in sorted(numbered):
        part = "test" if in_test_split(index) else "train"
        if split in ("all", part):
            records.append(ImageRecord(id=p.stem, lq=p, meta={"index": index, "split": part}))
    if not records:
        raise ValueError(
            f"Real3000 {root}: no numbered image for split {split!r} "
            f"({len(numbered)} numbered file(s) in the folder; test = {TEST_FIRST}-{TEST_LAST})"
        )
    return check_unique_ids(records, root)
