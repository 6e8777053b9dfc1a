"""The offline switch every layer honours before downloading weights (IQA members, VGG16, CLIP)."""
from __future__ import annotations

import os


def downloads_allowed() -> bool:
    """False when ``QUALITEACHER_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes."""
    flags = (os.environ.get("QUALITEACHER_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return not any(f.strip().lower() in ("1", "true", "yes") for f in flags)
