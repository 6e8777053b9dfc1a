"""ImageRecord: one item of any data set, as every layout reader returns it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qualiteacher.data.io import get_skip_log

if TYPE_CHECKING:
    from qualiteacher.data.io import SkipLog


# eq=False: records hold numpy boxes, whose element-wise `==` would make the generated
# __eq__/__hash__ raise; records compare by identity (compare fields explicitly in tests).
@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image of a data set.

    Attributes:
        id: stable unique id within the data set (relative path without suffix).
        lq: the degraded / real image (for clean-only sets: the clean image).
        gt: the clean reference, if any.
        boxes: ``(N, 4)`` float32 ``x1, y1, x2, y2`` in pixels; ``None`` when the image has no
            (usable) annotation, an empty ``(0, 4)`` array when it is annotated with no object.
        labels: ``N`` class names, one per box.
        meta: reader-specific extras (split, light condition, ...).
    """

    id: str
    lq: Path
    gt: Path | None = None
    boxes: np.ndarray | None = None
    labels: tuple[str, ...] = ()
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError(f"ImageRecord for {self.lq} has an empty id")
        object.__setattr__(self, "lq", Path(self.lq))
        if self.gt is not None:
            object.__setattr__(self, "gt", Path(self.gt))
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.boxes is None:
            if self.labels:
                raise ValueError(f"ImageRecord {self.id!r}: labels given without boxes")
            return
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"ImageRecord {self.id!r}: boxes must have shape (N, 4), got {boxes.shape}")
        if len(self.labels) != len(boxes):
            raise ValueError(
                f"ImageRecord {self.id!r}: {len(boxes)} boxes but {len(self.labels)} labels"
            )
        object.__setattr__(self, "boxes", boxes)


class AnnotationError(ValueError):
    """An annotation file could not be parsed; carries the ``path`` and the ``reason``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"bad annotation file {self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def relative_id(path: Path, root: Path) -> str:
    """The record id of ``path`` under ``root``: its relative POSIX path without suffix."""
    return Path(path).relative_to(root).with_suffix("").as_posix()


def format_names(names: list[str], limit: int = 10) -> str:
    """``a, b, c, ... (+N more)`` for error messages."""
    shown = ", ".join(names[:limit])
    return f"{shown}, ... (+{len(names) - limit} more)" if len(names) > limit else shown


def check_unique_ids(records: list[ImageRecord], where: str | Path,
                     skip_log: SkipLog | None = None) -> list[ImageRecord]:
    """``records`` without the ids that occur more than once (``a.png`` + ``a.jpg``): which file is
    meant is unknown, so every file of such an id is reported in ``skip_log`` (default: the
    process' `SkipLog`) and left out; the rest of the folder is read as usual."""
    groups: dict[str, list[ImageRecord]] = {}
    for r in records:
        groups.setdefault(r.id, []).append(r)
    clashes = {i: rs for i, rs in groups.items() if len(rs) > 1}
    if not clashes:
        return records
    log = skip_log if skip_log is not None else get_skip_log()
    for image_id, rs in clashes.items():
        names = " / ".join(r.lq.name for r in rs)
        for r in rs:
            log.record(r.lq, f"{where}: id {image_id!r} occurs with two suffixes ({names}); ids must be "
                             f"unique, so all {len(rs)} files are skipped")
    return [r for r in records if r.id not in clashes]
