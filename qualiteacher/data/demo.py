"""Offline demo data set: synthetic dehaze / derain / desnow / lowlight data from bundled photos.

The clean photos ship inside installed packages (no download): scikit-image's ``skimage.data``
(CC0 / public domain; the Middlebury stereo motorcycle comes with a disparity map, used as depth for
haze) and, where matplotlib is installed, its ``grace_hopper.jpg`` sample. Two photos
(`HELD_OUT_PHOTOS`) are reserved for the test sets and never used elsewhere. Random square crops
(30-85 % of the shorter side) are resized to ``size`` px.

Layout written under ``out`` (see docs/design.md)::

    <task>/labeled/{lq,gt}/0000.png   paired, "source" degradation
    <task>/unlabeled/0000.png         "real" degradation (other ranges and mixtures)
    <task>/test/{lq,gt}/0000.png      "real" degradation, held-out photos only
    <task>/val/{lq,gt}/0000.png       "real" degradation, training photos (choose settings here)
    <task>/unseen/{lq,gt}/0000.png    "real" degradation, photos no other split is cut from (other
                                      packages' sample photos, ``data/sample_photos.py``): how a
                                      setting does on new photos, without looking at test
    clean/0000.png                    clean crops of the training photos
    oracle/<task>/{lq,gt}/0000.png    the unlabeled images with their ground truth: read only by the
                                      study's ``oracle`` mode (the target-domain upper bound)
    manifest.csv                      one row per image (``path``, and ``gt_path`` for pairs)

Deterministic: one ``numpy`` Generator per task seeded with ``[seed, task offset]`` (and one for
the clean set), so the same seed gives byte-identical files, whatever subset of tasks is built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import skimage.data
from PIL import Image
from rich.progress import track
from scipy.ndimage import distance_transform_edt

from qualiteacher.data.capture import depth_proxy
from qualiteacher.data.degradations import DEGRADATIONS, get_degradation, params_to_dict
from qualiteacher.data.io import write_image
from qualiteacher.data.sample_photos import SAMPLE_PHOTOS, photo_path, read_photo
from qualiteacher.tasks import TASKS

TASK_OFFSETS: dict[str, int] = {"dehaze": 1, "derain": 2, "desnow": 3, "lowlight": 4}
CLEAN_OFFSET = 1000
HELD_OUT_PHOTOS: tuple[str, ...] = ("rocket", "chelsea")
# split -> domain; "val" (real-domain pairs of the TRAINING photos) is drawn last, so adding it left the
# other splits byte-identical: settings are chosen on it, never on the held-out test photos
SPLITS: dict[str, str] = {"labeled": "source", "unlabeled": "real", "test": "real", "val": "real"}
# "unseen": real-domain pairs of photos that neither training nor test is cut from. "val" shares its
# photos with training, so it rewards what was memorised (a derain student gave a clean val crop back
# at 26 dB and a clean test crop at 19); "unseen" asks what test asks without being test. It has its
# own generator ([seed, task offset, UNSEEN_OFFSET]), so adding it changed no other split's bytes.
UNSEEN_OFFSET = 7
UNSEEN_MAX_SIDE = 640  # larger photos are shrunk first (crops are 96 px; keeps the build quick)
BASE_COLUMNS: tuple[str, ...] = ("task", "split", "domain", "index", "path", "gt_path", "photo",
                                 "crop_x0", "crop_y0", "crop_x1", "crop_y1", "depth_source")


class Photo(NamedTuple):
    """A clean source photo: ``image`` uint8 ``(H, W, 3)``, ``depth`` float32 ``(H, W)`` in [0, 1]."""

    name: str
    image: np.ndarray
    depth: np.ndarray
    depth_source: str  # "disparity" or "proxy"


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _disparity_depth(disp: np.ndarray) -> np.ndarray:
    # depth ~ 1 / disparity, scaled so the far 1st percentile is 1; holes take the nearest valid value
    valid = np.isfinite(disp) & (disp > 0)
    _, (iy, ix) = distance_transform_edt(~valid, return_indices=True)
    disp = disp[iy, ix]
    far = float(np.percentile(disp, 1))
    return np.clip(far / disp, 0.0, 1.0).astype(np.float32)


def grace_hopper_path() -> Path | None:
    """matplotlib's bundled ``grace_hopper.jpg``, or None when matplotlib is not installed."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    return path if path.is_file() else None


def load_photos() -> dict[str, Photo]:
    """All bundled clean photos by name (grace_hopper only if matplotlib is installed)."""
    data = skimage.data
    raw: dict[str, np.ndarray] = {
        "astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
        "rocket": data.rocket(), "immunohistochemistry": data.immunohistochemistry(),
        "camera": data.camera(), "brick": data.brick(), "grass": data.grass(), "gravel": data.gravel(),
    }
    hopper = grace_hopper_path()
    if hopper is not None:
        with Image.open(hopper) as im:
            raw["grace_hopper"] = np.asarray(im.convert("RGB"))
    photos = {}
    for name, img in raw.items():
        img = np.ascontiguousarray(_rgb(img), dtype=np.uint8)
        photos[name] = Photo(name, img, depth_proxy(img.astype(np.float32) / 255.0), "proxy")
    left, _, disp = data.stereo_motorcycle()
    photos["motorcycle"] = Photo("motorcycle", np.ascontiguousarray(left), _disparity_depth(disp), "disparity")
    return dict(sorted(photos.items()))


class Crop(NamedTuple):
    """A crop of a `Photo`, resized to the demo size."""

    photo: Photo
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in photo pixels
    image: np.ndarray  # float32 (size, size, 3)
    depth: np.ndarray  # float32 (size, size)


def random_crop(photo: Photo, size: int, rng: np.random.Generator) -> Crop:
    """A random square crop (30-85 % of the shorter side) resized to ``size`` px."""
    h, w = photo.image.shape[:2]
    side = round(rng.uniform(0.3, 0.85) * min(h, w))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    image = Image.fromarray(photo.image).resize((size, size), Image.Resampling.BICUBIC, box=box)
    depth = Image.fromarray(photo.depth).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return Crop(photo, box, np.asarray(image, dtype=np.float32) / 255.0,
                np.clip(np.asarray(depth, dtype=np.float32), 0.0, 1.0))


def _crops(photos: Sequence[Photo], n: int, size: int, rng: np.random.Generator) -> list[Crop]:
    # photos visited in shuffled rounds so each one is used about equally
    order: list[int] = []
    while len(order) < n:
        order += rng.permutation(len(photos)).tolist()
    return [random_crop(photos[i], size, rng) for i in order[:n]]


def _row(task: str, split: str, domain: str, index: int, path: str, gt_path: str, crop: Crop) -> dict:
    x0, y0, x1, y1 = crop.box
    return {"task": task, "split": split, "domain": domain, "index": index, "path": path, "gt_path": gt_path,
            "photo": crop.photo.name, "crop_x0": x0, "crop_y0": y0, "crop_x1": x1, "crop_y1": y1,
            "depth_source": crop.photo.depth_source}


def unseen_photos(known: Sequence[str]) -> dict[str, Photo]:
    """The installed sample photos (``data/sample_photos.py``) whose names are not in ``known``,
    shrunk to at most ``UNSEEN_MAX_SIDE`` px, with a depth proxy."""
    photos = {}
    for key in sorted(SAMPLE_PHOTOS):
        path = None if key in known else photo_path(key)
        if path is None:
            continue
        img = Image.fromarray(read_photo(path))
        scale = UNSEEN_MAX_SIDE / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        arr = np.ascontiguousarray(np.asarray(img), dtype=np.uint8)
        photos[key] = Photo(key, arr, depth_proxy(arr.astype(np.float32) / 255.0), "proxy")
    return photos


def _build_task(out: Path, task: str, seed: int, train: list[Photo], test: list[Photo], size: int,
                counts: dict[str, int], unseen: list[Photo] = ()) -> list[dict]:
    deg = get_degradation(task)
    shared = np.random.default_rng([seed, TASK_OFFSETS[task]])  # the SPLITS, drawn in order
    plan = [(split, domain, test if split == "test" else train, shared) for split, domain in SPLITS.items()]
    if unseen and counts.get("unseen"):
        plan.append(("unseen", "real", unseen, np.random.default_rng([seed, TASK_OFFSETS[task], UNSEEN_OFFSET])))
    rows = []
    for split, domain, photos, rng in plan:
        for i, crop in enumerate(_crops(photos, counts[split], size, rng)):
            params = deg.sample(rng, domain)
            lq = deg.apply(crop.image, params, crop.depth)
            name = f"{i:04d}.png"
            if split == "unlabeled":
                path, gt_path = f"{task}/{split}/{name}", ""
                # the unlabeled photos' ground truth, kept aside under oracle/ for the study's
                # target-domain upper bound only: no layout reading DIR/<task> can see it
                oracle_lq, oracle_gt = f"oracle/{task}/lq/{name}", f"oracle/{task}/gt/{name}"
                write_image(out / oracle_gt, crop.image)
                write_image(out / oracle_lq, lq)
            else:
                path, gt_path = f"{task}/{split}/lq/{name}", f"{task}/{split}/gt/{name}"
                write_image(out / gt_path, crop.image)
            write_image(out / path, lq)
            rows.append(_row(task, split, domain, i, path, gt_path, crop) | params_to_dict(params))
            if split == "unlabeled":
                rows.append(_row(task, "oracle", domain, i, oracle_lq, oracle_gt, crop) | params_to_dict(params))
    return rows


def _progress(items: Sequence[str], enabled: bool):
    if not enabled:
        return items

    return track(items, description="building demo data")


def _param_columns() -> dict[str, str]:
    # column -> "int" / "float", in a fixed order whatever tasks were built
    columns: dict[str, str] = {}
    for deg in DEGRADATIONS.values():
        for f in dataclasses.fields(deg.params_type):
            columns.setdefault(f.name, f.type)
    return columns


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    # integer parameters stay integers next to the empty cells of other tasks' rows
    for name, kind in _param_columns().items():
        if kind == "int" and name in df.columns:
            df[name] = df[name].astype("Int64")
    return df


def build_demo(out: Path, seed: int = 0, tasks: Sequence[str] = TASKS, size: int = 96,
               n_labeled: int = 24, n_unlabeled: int = 24, n_test: int = 8, n_clean: int = 48,
               n_val: int = 8, n_unseen: int = 48, progress: bool = True,
               overwrite: bool = False) -> pd.DataFrame:
    """Write the demo data set under ``out`` and return its manifest (also ``out/manifest.csv``).

    Raises ``FileExistsError`` if ``out`` already holds a ``manifest.csv`` and ``overwrite`` is
    False; with ``overwrite`` only the folders this function writes (``clean/``, ``<task>/``) and
    the manifest are replaced.
    """
    out = Path(out)
    tasks = list(dict.fromkeys((tasks,) if isinstance(tasks, str) else tasks))
    unknown = [t for t in tasks if t not in TASK_OFFSETS]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; available: {list(TASKS)}")
    if size < 16:
        raise ValueError(f"demo image size must be >= 16 px, got {size}")
    if min(n_labeled, n_unlabeled, n_test, n_clean, n_val, n_unseen) < 0:
        raise ValueError("image counts must be >= 0")
    if (out / "manifest.csv").exists():
        if not overwrite:
            raise FileExistsError(f"{out / 'manifest.csv'} exists; pass overwrite=True to rebuild the demo data")
        for sub in ("clean", "oracle", *TASKS):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    photos = load_photos()
    train = [p for name, p in photos.items() if name not in HELD_OUT_PHOTOS]
    test = [photos[name] for name in HELD_OUT_PHOTOS]
    counts = {"labeled": n_labeled, "unlabeled": n_unlabeled, "test": n_test, "val": n_val, "unseen": n_unseen}
    unseen = list(unseen_photos(list(photos)).values()) if n_unseen else []

    rows = []
    for i, crop in enumerate(_crops(train, n_clean, size, np.random.default_rng([seed, CLEAN_OFFSET]))):
        path = f"clean/{i:04d}.png"
        write_image(out / path, crop.image)
        rows.append(_row("clean", "clean", "clean", i, path, "", crop))
    for task in _progress(list(tasks), progress):
        rows += _build_task(out, task, seed, train, test, size, counts, unseen)

    manifest = _typed(pd.DataFrame(rows, columns=[*BASE_COLUMNS, *_param_columns()]))
    manifest.to_csv(out / "manifest.csv", index=False, lineterminator="\n")
    return manifest


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a demo ``manifest.csv`` (``gt_path`` is ``""`` for unpaired rows)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo manifest not found: {path} (build it with `qualiteacher data demo`)")
    df = pd.read_csv(path)
    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a demo manifest: missing columns {missing}")
    df["gt_path"] = df["gt_path"].fillna("")
    return _typed(df)


def summarize_manifest(df: pd.DataFrame) -> str:
    """A readable table: images, photos and the task's main degradation parameter per task / split."""
    lines = [f"{'task':<9} {'split':<10} {'domain':<7} {'images':>6} {'photos':>6}  main parameter (mean [min, max])"]
    for (task, split), g in df.groupby(["task", "split"], sort=False):
        main = ""
        if task in DEGRADATIONS:
            name = DEGRADATIONS[task].main_param
            v = pd.to_numeric(g[name], errors="coerce")
            main = f"{name} {v.mean():.4g} [{v.min():.4g}, {v.max():.4g}]"
        lines.append(f"{task:<9} {split:<10} {g['domain'].iloc[0]:<7} {len(g):>6} {g['photo'].nunique():>6}  {main}")
    return "\n".join(lines)
