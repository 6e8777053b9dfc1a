"""The audit's clean photos: where they come from and how they split into tune and report sets.

Every photo ships inside an installed package (nothing is downloaded); a package that is missing
just removes its photos. ``AUDIT_SOURCES`` is the catalogue: photo key -> (package, file inside
it). The demo's own ground truth (``DIR/<task>/{test,val}/gt`` of a demo data folder) adds crops
of the photos it was cut from, filed under those photos.

The split is by photo, never by crop (crops of one photo are never on both sides), and each
photo's side depends on its key alone: ``split_of(key)`` hashes ``SPLIT_SALT + key`` and puts
the photo in ``tune`` when the hash falls below ``TUNE_FRACTION``. A photo that goes missing or a
new one changes no other photo's side. Weights and ranges are chosen on ``tune``; ``report`` is
only measured. The photos the offline NIQE was fitted on (``offline.NIQE_FIT_PHOTOS``) are in
neither set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from qualiteacher.data.sample_photos import SAMPLE_PHOTOS, photo_path, read_photo
from qualiteacher.iqa.offline import NIQE_FIT_PHOTOS

Split = Literal["tune", "report"]
SPLIT_SALT = "qualiteacher-iqa-audit-split-v1:"
TUNE_FRACTION = 0.35

# the catalogue lives in data/sample_photos.py (the demo data reads it too)
AUDIT_SOURCES: dict[str, tuple[str, str]] = SAMPLE_PHOTOS
# (centre y, centre x, side as a fraction of the shorter side): the whole centre square, two
# 60 % zooms and a 30 % detail (large and small crops of one photo)
AUDIT_CROPS: tuple[tuple[float, float, float], ...] = (
    (0.5, 0.5, 1.0), (0.35, 0.3, 0.6), (0.65, 0.7, 0.6), (0.45, 0.55, 0.3))


def split_of(key: str, salt: str = SPLIT_SALT, tune_fraction: float = TUNE_FRACTION) -> Split:
    """``tune`` or ``report`` for a photo key, from a hash of the key alone."""
    h = int.from_bytes(hashlib.sha1((salt + key).encode()).digest()[:8], "big") / 2**64
    return "tune" if h < tune_fraction else "report"


def split_keys(keys: Sequence[str], split: Split | None) -> list[str]:
    """The keys of one side (``None``: all), in the order given."""
    return [k for k in keys if split is None or split_of(k) == split]


def catalogue_photos(split: Split | None = None) -> dict[str, np.ndarray]:
    """The installed catalogue photos of one side (``None``: both), never a NIQE fit photo."""
    out = {}
    for key in split_keys(list(AUDIT_SOURCES), split):
        if key in NIQE_FIT_PHOTOS:
            raise ValueError(f"audit photo {key!r} was used to fit the offline NIQE")
        path = photo_path(key)
        if path is not None:
            out[key] = read_photo(path)
    return out


def demo_gt_photos(demo_root: str | Path, task: str, split: Split | None = None) -> dict[str, np.ndarray]:
    """The demo data's ground truth of ``task`` (test and val splits) as ``<photo>@<split>/<file>``
    -> uint8 RGB, filed by the photo each crop was cut from (the manifest's ``photo`` column);
    crops of the NIQE fit photos are left out. Empty when the folder has no manifest."""
    import pandas as pd  # lazy: pandas (0.3 s) only to read the demo data's manifest

    root = Path(demo_root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    table = pd.read_csv(manifest)
    rows = table[(table["task"] == task) & table["split"].isin(["test", "val"]) & table["gt_path"].notna()]
    out = {}
    for row in rows.itertuples():
        photo = str(row.photo)
        if photo in NIQE_FIT_PHOTOS or (split is not None and split_of(photo) != split):
            continue
        path = root / str(row.gt_path)
        if path.is_file():
            out[f"{photo}@{row.split}/{Path(str(row.gt_path)).stem}"] = read_photo(path)
    return out


def photo_of(image_name: str) -> str:
    """The photo key of an audit image name (``<photo>#<crop>`` or ``<photo>@<demo file>#0``)."""
    return image_name.split("#")[0].split("@")[0]
