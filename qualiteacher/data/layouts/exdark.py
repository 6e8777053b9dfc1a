"""ExDark (real low-light images with detection boxes, 12 classes).

```
root/imageclasslist.txt                  (or root/Groundtruth/imageclasslist.txt)
root/ExDark/<Class>/<image>              (or root/<Class>/<image>)
root/ExDark_Annno/<Class>/<image>.txt    (the data set's own spelling; ExDark_Anno/ or Annotations/
                                          are accepted too)
```

``imageclasslist.txt``: a header line, then one row per image: name, class (1-12, in the order of
`EXDARK_CLASSES`), light (1-10, `EXDARK_LIGHT`), indoor/outdoor (1-2), split (1/2/3 = train/val/
test). Box files: a ``% bbGt version=3`` header, then rows ``class l t w h ...`` (extra columns
ignored), converted to ``x1, y1, x2, y2 = l, t, l + w, t + h``.

Rules: malformed list rows, listed images missing on disk and images on disk absent from the list
are reported and left out. Annotations follow the RTTS rule: a box file that cannot be parsed
completely is dropped as a whole (``boxes=None``, recorded in the `SkipLog`); a missing box file
gives ``boxes=None`` (reported). File names are matched case-insensitively (the data set mixes
``.jpg``/``.JPG``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qualiteacher.data.io import SkipLog, get_skip_log, list_images
from qualiteacher.data.records import (
    AnnotationError,
    ImageRecord,
    check_unique_ids,
    format_names,
)

log = logging.getLogger(__name__)

EXDARK_CLASSES: tuple[str, ...] = (
    "Bicycle", "Boat", "Bottle", "Bus", "Car", "Cat", "Chair", "Cup", "Dog", "Motorbike", "People", "Table",
)
EXDARK_LIGHT: tuple[str, ...] = (
    "Low", "Ambient", "Object", "Single", "Weak", "Strong", "Screen", "Window", "Shadow", "Twilight",
)
SPLITS = {"train": 1, "val": 2, "test": 3}
ANNOTATION_DIRS = ("ExDark_Annno", "ExDark_Anno", "Annotations")
LIST_FILES = ("imageclasslist.txt", "Groundtruth/imageclasslist.txt")


class ExDarkRow(NamedTuple):
    name: str
    class_index: int  # 1..12
    light: int  # 1..10
    in_out: int  # 1 indoor, 2 outdoor
    split: int  # 1 train, 2 val, 3 test


def parse_class_list(path: str | os.PathLike) -> list[ExDarkRow]:
    """Rows of ``imageclasslist.txt``; malformed or duplicate rows are reported and left out."""
    path = Path(path)
    rows: list[ExDarkRow] = []
    bad: list[str] = []
    seen: dict[str, int] = {}
    limits = (len(EXDARK_CLASSES), len(EXDARK_LIGHT), 2, 3)
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=4)
        try:
            values = tuple(int(v) for v in parts[1:])
        except ValueError:
            values = ()
        if len(parts) != 5 or len(values) != 4:
            if n > 1:  # line 1 is the header
                bad.append(f"line {n} ({line.strip()[:40]!r})")
            continue
        if any(not 1 <= v <= hi for v, hi in zip(values, limits)):
            bad.append(f"line {n} (value out of range: {line.strip()[:40]!r})")
        elif parts[0].lower() in seen:
            bad.append(f"line {n} (duplicate of line {seen[parts[0].lower()]})")
        else:
            seen[parts[0].lower()] = n
            rows.append(ExDarkRow(parts[0], *values))
    if bad:
        log.warning("ExDark %s: ignoring %d malformed row(s): %s", path, len(bad), format_names(bad))
    return rows


def parse_bbgt(path: str | os.PathLike) -> tuple[np.ndarray, tuple[str, ...]]:
    """Boxes ``(N, 4)`` x1, y1, x2, y2 and labels of one ``bbGt`` file; raises `AnnotationError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AnnotationError(path, f"cannot read ({exc})") from None
    if not text.strip():
        raise AnnotationError(path, "empty file (expected a '% bbGt' header)")
    boxes, labels = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("%"):
            continue
        parts = line.split()
        if len(parts) < 5:
            raise AnnotationError(path, f"line {n}: {line[:60]!r} has fewer than 5 columns")
        try:
            l, t, w, h = (float(v) for v in parts[1:5])
        except ValueError:
            raise AnnotationError(path, f"line {n}: {line[:60]!r} is not 'class l t w h'") from None
        if w < 0 or h < 0:
            raise AnnotationError(path, f"line {n}: negative width/height in {line[:60]!r}")
        boxes.append((l, t, l + w, t + h))
        labels.append(parts[0])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), tuple(labels)


def _folders(root: Path) -> tuple[Path, Path, dict[str, Path], Path | None]:
    """ExDark's image list, image root, class folders and annotation folder (None: no boxes)
    under ``root``; ``FileNotFoundError`` naming what is missing."""
    list_file = next((root / f for f in LIST_FILES if (root / f).is_file()), None)
    if list_file is None:
        raise FileNotFoundError(f"ExDark: no image list in {root} (looked for {', '.join(LIST_FILES)})")
    image_root = root / "ExDark" if (root / "ExDark").is_dir() else root
    class_dirs = {c: image_root / c for c in EXDARK_CLASSES if (image_root / c).is_dir()}
    if not class_dirs:
        raise FileNotFoundError(
            f"ExDark: no class folder ({', '.join(EXDARK_CLASSES)}) in {image_root}")
    ann_root = next((root / d for d in ANNOTATION_DIRS if (root / d).is_dir()), None)
    if ann_root is None:
        log.warning("ExDark %s: no annotation folder (%s); images get no boxes", root, ", ".join(ANNOTATION_DIRS))
    return list_file, image_root, class_dirs, ann_root


def read_exdark(
    root: str | os.PathLike, split: str = "train", skip_log: SkipLog | None = None
) -> list[ImageRecord]:
    """Records of ExDark for ``split`` in ``train`` / ``val`` / ``test`` / ``all``.

    id = ``<Class>/<stem>``; ``meta``: ``class``, ``light``, ``indoor``, ``split``, ``annotated``.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"ExDark split must be one of {', '.join((*SPLITS, 'all'))}; got {split!r}")
    root = Path(root)
    list_file, image_root, class_dirs, ann_root = _folders(root)
    skip_log = skip_log if skip_log is not None else get_skip_log()

    # (class, lower-case name) -> path, for images and for box files
    images = {(c, p.name.lower()): p for c, d in class_dirs.items() for p in list_images(d)}
    boxes_files = {} if ann_root is None else {
        (p.parent.name, p.name.lower()): p for p in ann_root.glob("*/*.txt")
    }
    rows = parse_class_list(list_file)
    listed = {(EXDARK_CLASSES[r.class_index - 1], r.name.lower()) for r in rows}
    records, missing, no_ann, unknown = [], [], [], Counter()
    for row in rows:
        cls = EXDARK_CLASSES[row.class_index - 1]
        path = images.get((cls, row.name.lower()))
        if path is None:
            missing.append(f"{cls}/{row.name}")
            continue
        if split != "all" and row.split != SPLITS[split]:
            continue
        meta: dict[str, object] = {
            "class": cls, "light": EXDARK_LIGHT[row.light - 1], "indoor": row.in_out == 1,
            "split": next(k for k, v in SPLITS.items() if v == row.split), "annotated": False,
        }
        boxes, labels = None, ()
        ann = boxes_files.get((cls, f"{row.name.lower()}.txt")) or boxes_files.get((cls, f"{path.stem.lower()}.txt"))
        if ann is None:
            no_ann.append(f"{cls}/{row.name}")
        else:
            try:
                boxes, labels = parse_bbgt(ann)
            except AnnotationError as exc:
                skip_log.record(exc.path, exc.reason)
                meta["annotation_error"] = exc.reason
            else:
                meta["annotated"] = True
                unknown.update(n for n in labels if n not in EXDARK_CLASSES)
        records.append(ImageRecord(id=f"{cls}/{path.stem}", lq=path, boxes=boxes, labels=labels, meta=meta))
    unlisted = sorted(f"{c}/{p.name}" for (c, name), p in images.items() if (c, name) not in listed)
    for what, names in (("listed image(s) missing on disk", missing),
                        ("image(s) on disk not in the list (ignored)", unlisted),
                        ("image(s) without a box file (no boxes)", no_ann if ann_root else [])):
        if names:
            log.warning("ExDark %s: %d %s: %s", root, len(names), what, format_names(names))
    if unknown:
        log.warning("ExDark %s: unknown box class names kept as they are: %s",
                    root, ", ".join(f"{n} ({c})" for n, c in sorted(unknown.items())))
    if not records:
        raise ValueError(f"ExDark {root}: no readable listed image for split {split!r}")
    return check_unique_ids(records, image_root, skip_log)
