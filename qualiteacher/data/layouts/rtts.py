"""RTTS (real hazy images with detection boxes): Pascal VOC layout.

```
root/JPEGImages/<name>.png|jpg
root/Annotations/<name>.xml      <object><name>car</name><bndbox><xmin>..</xmin>...</bndbox></object>
```

Annotation rule (shared with ExDark): an annotation that cannot be parsed completely is dropped as a
whole, never half-read: the image keeps ``boxes=None`` (detection evaluation skips it, restoration
and NR-IQA still use it) and the file is recorded in the `SkipLog` with the reason. An image without
an annotation file also gets ``boxes=None`` (reported); an image annotated with no object gets an
empty ``(0, 4)`` array. Unknown class names are kept and reported.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
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

RTTS_CLASSES: tuple[str, ...] = ("bicycle", "bus", "car", "motorbike", "person")


class VocObjects(NamedTuple):
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    labels: tuple[str, ...]
    difficult: tuple[bool, ...]


def parse_voc_xml(path: str | os.PathLike) -> VocObjects:
    """Parse the objects of one VOC annotation file; raises `AnnotationError` naming the problem."""
    path = Path(path)
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise AnnotationError(path, f"malformed XML ({exc})") from None
    except OSError as exc:
        raise AnnotationError(path, f"cannot read ({exc})") from None
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(tree.getroot().iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise AnnotationError(path, f"object {k} has no <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(path, f"object {k} ({name}) has no <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = bndbox.findtext(tag)
            try:
                coords.append(float(text))
            except (TypeError, ValueError):
                raise AnnotationError(path, f"object {k} ({name}): <{tag}> is {text!r}, not a number") from None
        x1, y1, x2, y2 = coords
        if x2 < x1 or y2 < y1:
            raise AnnotationError(path, f"object {k} ({name}): box {coords} has max < min")
        boxes.append(coords)
        labels.append(name)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return VocObjects(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), tuple(labels), tuple(difficult))


def read_rtts(
    root: str | os.PathLike,
    classes: tuple[str, ...] = RTTS_CLASSES,
    skip_log: SkipLog | None = None,
) -> list[ImageRecord]:
    """Records of ``root/JPEGImages`` with boxes and labels from ``root/Annotations``.

    ``meta``: ``annotated`` (bool) and ``difficult`` (one bool per box). See the module docstring
    for missing and malformed annotations; class names outside ``classes`` are reported.
    """
    root = Path(root)
    image_dir, ann_dir = root / "JPEGImages", root / "Annotations"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"RTTS layout needs the image folder {image_dir}")
    if not ann_dir.is_dir():
        log.warning("RTTS %s: no Annotations/ folder; images get no boxes", root)
    skip_log = skip_log if skip_log is not None else get_skip_log()
    paths = list_images(image_dir)
    if not paths:
        raise ValueError(f"RTTS: no image files in {image_dir}")
    records, missing, unknown = [], [], Counter()
    for p in paths:
        xml = ann_dir / f"{p.stem}.xml"
        meta: dict[str, object] = {"annotated": False, "difficult": ()}
        boxes, labels = None, ()
        if not xml.is_file():
            missing.append(p.name)
        else:
            try:
                objs = parse_voc_xml(xml)
            except AnnotationError as exc:
                skip_log.record(exc.path, exc.reason)
                meta["annotation_error"] = exc.reason
            else:
                boxes, labels = objs.boxes, objs.labels
                meta = {"annotated": True, "difficult": objs.difficult}
                unknown.update(name for name in labels if name not in classes)
        records.append(ImageRecord(id=p.stem, lq=p, boxes=boxes, labels=labels, meta=meta))
    if missing and ann_dir.is_dir():
        log.warning("RTTS %s: %d image(s) without an annotation file (no boxes): %s",
                    root, len(missing), format_names(missing))
    if unknown:
        log.warning("RTTS %s: class names outside %s kept as they are: %s", root, ", ".join(classes),
                    ", ".join(f"{n} ({c})" for n, c in sorted(unknown.items())))
    if ann_dir.is_dir():
        stems = {p.stem for p in paths}
        orphans = sorted(x.name for x in ann_dir.glob("*.xml") if x.stem not in stems)
        if orphans:
            log.warning("RTTS %s: %d annotation file(s) without an image: %s",
                        root, len(orphans), format_names(orphans))
    return check_unique_ids(records, image_dir, skip_log)
