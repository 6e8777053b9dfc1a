"""Data-set readers, one per folder layout, all returning ``list[ImageRecord]``.

Short names for configs: an explicit table (`LAYOUTS`), `list_layouts()` and `read_layout()`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from qualiteacher.data.layouts.exdark import EXDARK_CLASSES, read_exdark
from qualiteacher.data.layouts.paired import read_paired
from qualiteacher.data.layouts.real3000 import read_real3000
from qualiteacher.data.layouts.realsnow import read_realsnow
from qualiteacher.data.layouts.rtts import RTTS_CLASSES, read_rtts
from qualiteacher.data.layouts.unpaired import read_unpaired
from qualiteacher.data.records import ImageRecord

LAYOUTS: dict[str, Callable[..., list[ImageRecord]]] = {
    "paired": read_paired,
    "unpaired": read_unpaired,
    "real3000": read_real3000,
    "rtts": read_rtts,
    "exdark": read_exdark,
    "realsnow": read_realsnow,
}


def list_layouts() -> list[str]:
    """Names accepted by `read_layout`."""
    return sorted(LAYOUTS)


def check_layout(name: str) -> Callable[..., list[ImageRecord]]:
    """The reader of layout ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown data layout {name!r}; known layouts: {', '.join(list_layouts())}")
    return LAYOUTS[name]


def read_layout(name: str, root: str | os.PathLike, **options: object) -> list[ImageRecord]:
    """Read the data set at ``root`` with the reader of layout ``name``.

    ``options`` go to the reader (e.g. ``split="test"`` for ``real3000``); an option the reader does
    not take, an unknown name or a missing folder raise a clear error.
    """
    reader = check_layout(name)
    root = Path(root)
    if not root.is_dir():
        parent = root.parent
        present = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        hint = f"; {parent} holds: {', '.join(present[:20]) or 'nothing'}" if parent.is_dir() else ""
        raise FileNotFoundError(f"{name} data folder does not exist: {root}{hint}")
    params = inspect.signature(reader).parameters
    accepted = [p for p in params if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"layout {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    return reader(root, **options)


__all__ = [
    "EXDARK_CLASSES", "LAYOUTS", "RTTS_CLASSES", "check_layout", "list_layouts", "read_exdark",
    "read_layout", "read_paired", "read_real3000", "read_realsnow", "read_rtts", "read_unpaired",
]
