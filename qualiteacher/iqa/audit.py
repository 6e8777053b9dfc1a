"""Audit of an IQA ensemble: does it rank degraded and destroyed images below their clean source?

Stage 3 learns whatever the ensemble rewards, so an ensemble that scores a destroyed image above
its clean source teaches destruction. The audit measures, on clean images:

- **ladders**: the task's own degradation and generic blur / noise / JPEG at 5 strengths
  (``sanity.ladder_table``): Spearman rho of every member and of the fused score against strength
  (sign flipped: 1 = the score falls as the degradation grows);
- **destruction pairs**: every transform of ``destruction.DESTRUCTIONS`` plus the output of an
  untrained (random-init) student, each paired with its clean source: the fraction of pairs where
  the destroyed image scores strictly **below** the source, per member and fused, and the list of
  the pairs that fail.

Default images: crops of clean photos that ship with installed packages, split by photo into a
``tune`` set (weights and ranges are chosen there) and a ``report`` set (only measured), plus the
demo data's own ground truth when a demo folder is at hand (``audit_photos.py``); none of them was
used to fit a member (the offline NIQE is fitted on ``offline.NIQE_FIT_PHOTOS``). The audit runs
on both and prints them side by side: a report figure far below the tune figure is overfitting.
``folder_images`` takes the user's own clean photos. Writing the report: ``audit_report.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import skimage.data
import torch
from PIL import Image
from torch import Tensor

from qualiteacher.data.io import ImageReadError, list_images, read_image
from qualiteacher.iqa.audit_photos import (
    AUDIT_CROPS,
    AUDIT_SOURCES,
    Split,
    catalogue_photos,
    demo_gt_photos,
    photo_path,
    read_photo,
)
from qualiteacher.iqa.destruction import DESTRUCTIONS
from qualiteacher.iqa.ensemble import Ensemble, EnsembleScores
from qualiteacher.iqa.offline import NIQE_FIT_PHOTOS
from qualiteacher.iqa.sanity import ladder_summary, ladder_table
from qualiteacher.say import say

UNTRAINED = "untrained_student"
TRAINED = "trained_student"  # a trained student's rework of the clean photo (``iqa audit --checkpoint``)
FUSED = "fused"
GENERIC_LADDERS: tuple[str, ...] = ("blur", "noise", "jpeg")
MIN_PASS_FRACTION = 0.95  # over all pairs
MIN_KIND_PASS_FRACTION = 0.9  # for every destruction
MIN_LADDER_RHO = 0.9  # for every ladder


class AuditImages(NamedTuple):
    images: Tensor  # (N, 3, size, size) in [0, 1]
    names: list[str]  # "<photo>#<crop>" per image


class MemberScores(NamedTuple):
    normalized: dict[str, np.ndarray]  # member (and "fused") -> (N,) in [0, 1], NaN: unscorable
    errors: dict[str, int]  # member -> number of images it could not score


class AuditResult(NamedTuple):
    ladders: pd.DataFrame  # kind, image, scorer, rho
    ladder_summary: pd.DataFrame  # mean rho: kind (rows) x scorer (columns, fused last)
    pairs: pd.DataFrame  # destruction, image, scorer, source, destroyed, passed
    pass_table: pd.DataFrame  # pass fraction: destruction (+ "all") x scorer (fused last)
    failures: pd.DataFrame  # the fused score's failing pairs
    meta: dict[str, Any]  # preset, task, size, images, seconds, random_weights, member errors


# ----------------------------------------------------------------------------------------- images
def square_crops(image: np.ndarray, size: int, crops: Sequence[tuple[float, float, float]] = AUDIT_CROPS) -> list[np.ndarray]:
    """Square crops of an RGB image (uint8 or float in [0, 1]), area-resized to ``size`` px."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    h, w = image.shape[:2]
    s = min(h, w)
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    out = []
    for cy, cx, frac in crops:
        side = max(1, round(frac * s))
        y0 = int(np.clip(round(cy * h - side / 2), 0, h - side))
        x0 = int(np.clip(round(cx * w - side / 2), 0, w - side))
        crop = pil.resize((size, size), Image.Resampling.BOX, box=(x0, y0, x0 + side, y0 + side))
        out.append(np.asarray(crop, dtype=np.float32) / 255.0)
    return out


def _stack(images: list[np.ndarray], names: list[str]) -> AuditImages:
    return AuditImages(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float(), names)


def bundled_photo(name: str) -> np.ndarray | None:
    """A clean photo shipped with an installed package as uint8 RGB: a key of
    ``audit_photos.AUDIT_SOURCES`` or ``skimage.data.<name>``; None when its package is missing."""
    if name in AUDIT_SOURCES:
        path = photo_path(name)
        return None if path is None else read_photo(path)
    image = np.asarray(getattr(skimage.data, name)())
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def default_images(size: int = 96, split: Split | None = "report", photos: Sequence[str] | None = None,
                   demo_root: str | Path | None = None, task: str | None = None,
                   crops: Sequence[tuple[float, float, float]] = AUDIT_CROPS) -> AuditImages:
    """Crops of the bundled clean photos: the catalogue's ``split`` side (``photos`` names them
    instead), plus the demo data's ground truth of ``task`` under ``demo_root`` (same split, one
    crop each: they are crops already). Never the NIQE fit photos."""
    if photos is not None:
        clash = set(photos) & set(NIQE_FIT_PHOTOS)
        if clash:
            raise ValueError(f"audit photos {sorted(clash)} were used to fit the offline NIQE: choose others")
        found = {name: bundled_photo(name) for name in photos}
        chosen = {name: img for name, img in found.items() if img is not None}
    else:
        chosen = catalogue_photos(split)
    images, names = [], []
    for name, photo in chosen.items():
        for j, crop in enumerate(square_crops(photo, size, crops)):
            images.append(crop)
            names.append(f"{name}#{j}")
    if demo_root is not None and task is not None and photos is None:
        for name, photo in demo_gt_photos(demo_root, task, split).items():
            images.append(square_crops(photo, size, [(0.5, 0.5, 1.0)])[0])
            names.append(f"{name}#0")
    if not images:
        raise ValueError(f"no audit photo found (split {split!r}): are scikit-image and matplotlib installed?")
    return _stack(images, names)


def folder_images(folder: str | Path, size: int = 96) -> AuditImages:
    """Crops of the user's clean photos in ``folder``; unreadable files are reported and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"--images: {folder} is not a folder of clean images")
    images, names = [], []
    for path in list_images(folder, recursive=True):
        try:
            img = read_image(path)
        except ImageReadError as err:
            say(f"audit: skipped {path}: {err.reason}", "quiet")
            continue
        for j, crop in enumerate(square_crops(img, size)):
            images.append(crop)
            names.append(f"{path.stem}#{j}")
    if not images:
        raise ValueError(f"--images: no readable image in {folder}")
    return _stack(images, names)


# ---------------------------------------------------------------------------------------- scoring
def score_images(ensemble: Ensemble, images: Tensor) -> MemberScores:
    """Normalised member scores and the fused score (key ``fused``) of a batch, as training sees
    them (the ensemble's guards give an image a member cannot judge NaN or that member's worst)."""
    try:
        scores = [ensemble(images)]
    except Exception:  # noqa: BLE001 - an ensemble without guards: one image must not sink the batch
        scores = [_score_one(ensemble, images[i : i + 1]) for i in range(images.shape[0])]
    names = [s.name for s in ensemble.specs]
    out = {name: torch.cat([s.normalized[name] for s in scores]).detach().cpu().double().numpy() for name in names}
    out[FUSED] = torch.cat([s.fused for s in scores]).detach().cpu().double().numpy()
    return MemberScores(out, {name: int(np.isnan(v).sum()) for name, v in out.items()})


def _score_one(ensemble: Ensemble, image: Tensor) -> EnsembleScores:
    try:
        return ensemble(image)
    except Exception:  # noqa: BLE001 - unscorable: NaN everywhere, counted as a failed pair
        nan = torch.full((1,), float("nan"))
        return EnsembleScores({}, {s.name: nan for s in ensemble.specs}, nan, torch.full((1,), -1))


# (images (B, 3, H, W) in [0, 1], seed) -> a student's outputs; the caller passes one in (the CLI:
# ``training.students.untrained_student_outputs``), as restoring is a training-layer job
StudentOutputs = Callable[[Tensor, int], Tensor]


# ----------------------------------------------------------------------------------------- tables
def pair_rows(destruction: str, names: Sequence[str], source: dict[str, np.ndarray],
              destroyed: dict[str, np.ndarray], keep: np.ndarray | None = None) -> pd.DataFrame:
    """One row per (image, scorer) of a destruction; ``keep`` drops images the transform left unchanged."""
    rows = []
    for scorer in source:
        for i, name in enumerate(names):
            if keep is not None and not keep[i]:
                continue
            rows.append({"destruction": destruction, "image": name, "scorer": scorer,
                         "source": float(source[scorer][i]), "destroyed": float(destroyed[scorer][i])})
    return pd.DataFrame(rows, columns=["destruction", "image", "scorer", "source", "destroyed"])


def pass_fractions(pairs: pd.DataFrame) -> pd.DataFrame:
    """Fraction of pairs whose destroyed score is strictly below the source score (a NaN on either
    side fails), per destruction (rows, plus ``all``) and scorer (columns, ``fused`` last)."""
    pairs = pairs.assign(passed=(pairs["destroyed"] < pairs["source"]).astype(float))
    table = pairs.pivot_table(index="destruction", columns="scorer", values="passed", aggfunc="mean", sort=False)
    table.loc["all"] = pairs.groupby("scorer", sort=False)["passed"].mean()
    cols = [c for c in table.columns if c != FUSED] + ([FUSED] if FUSED in table.columns else [])
    return table[cols]


def failing_pairs(pairs: pd.DataFrame, scorer: str = FUSED) -> pd.DataFrame:
    """Pairs of ``scorer`` where the destroyed image does not score below its source."""
    sub = pairs[pairs["scorer"] == scorer]
    bad = sub[~(sub["destroyed"] < sub["source"])]
    return bad.assign(margin=bad["destroyed"] - bad["source"]).drop(columns="scorer").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ audit
def run_audit(ensemble: Ensemble, task: str, images: AuditImages, preset: str = "?", seed: int = 0,
              random_weights: bool = False, ladders: bool = True,
              student_outputs: StudentOutputs | None = None,
              trained_outputs: StudentOutputs | None = None) -> AuditResult:
    """Ladders and destruction pairs of ``ensemble`` on ``images`` (see the module doc);
    ``student_outputs`` adds the untrained student's pairs (row ``untrained_student``),
    ``trained_outputs`` a trained student's restoration of each clean photo (row
    ``trained_student``: a grader that prefers it to the photo pays the student for reworking
    what needed nothing, the do-no-harm failure)."""
    start = time.perf_counter()
    random_weights = random_weights or bool(getattr(ensemble, "meaningless", False))
    x = images.images
    src = score_images(ensemble, x)
    source = src.normalized
    errors = {f"source/{k}": v for k, v in src.errors.items() if v}
    parts = []
    outputs = {kind: fn(x, seed) for kind, fn in DESTRUCTIONS.items()}
    if student_outputs is not None:
        outputs[UNTRAINED] = student_outputs(x, seed)
    if trained_outputs is not None:
        outputs[TRAINED] = trained_outputs(x, seed)
    for kind, y in outputs.items():
        changed = (y - x).flatten(1).abs().amax(1).gt(1 / 512).numpy()  # a grey photo is its own grey-out
        got = score_images(ensemble, y)
        parts.append(pair_rows(kind, images.names, source, got.normalized, changed))
        errors.update({f"{kind}/{k}": v for k, v in got.errors.items() if v})
    pairs = pd.concat(parts, ignore_index=True)
    pairs["passed"] = pairs["destroyed"] < pairs["source"]
    if ladders:
        arrays = [im.permute(1, 2, 0).numpy() for im in x]
        ladder = ladder_table(ensemble, arrays, [task, *GENERIC_LADDERS], seed=seed)
        ladder["image"] = [images.names[i] for i in ladder["image"]]
        summary = ladder_summary(ladder)
    else:
        ladder, summary = pd.DataFrame(columns=["kind", "image", "scorer", "rho"]), pd.DataFrame()
    meta = {"preset": preset, "task": task, "size": int(x.shape[-1]), "images": len(images.names),
            "pairs": int((pairs["scorer"] == FUSED).sum()), "seed": seed, "random_weights": random_weights,
            "random_members": list(getattr(ensemble, "random_members", ())),
            "member_errors": errors, "seconds": round(time.perf_counter() - start, 1)}
    return AuditResult(ladder, summary, pairs, pass_fractions(pairs), failing_pairs(pairs), meta)


def verdict(result: AuditResult, min_pass: float = MIN_PASS_FRACTION, min_kind: float = MIN_KIND_PASS_FRACTION,
            min_rho: float = MIN_LADDER_RHO) -> tuple[bool, str]:
    """Whether the fused score passes: pass fraction >= ``min_pass`` over all pairs and >=
    ``min_kind`` for every destruction, and every ladder's rho (the task's, blur, noise, JPEG) >=
    ``min_rho``; with a one-line reason."""
    fused = result.pass_table[FUSED]
    frac = float(fused.loc["all"])
    kinds = fused.drop("all")
    worst_kind = str(kinds.idxmin()) if len(kinds) else "-"
    ladders = result.ladder_summary[FUSED] if len(result.ladder_summary) else pd.Series(dtype=float)
    worst_ladder = str(ladders.idxmin()) if len(ladders) else "-"
    rho = float(ladders.min()) if len(ladders) else math.nan
    ok = frac >= min_pass and (not len(kinds) or float(kinds.min()) >= min_kind) and (math.isnan(rho) or rho >= min_rho)
    text = (f"fused ranks destroyed below source in {frac:.1%} of {result.meta['pairs']} pairs "
            f"(need >= {min_pass:.0%}); worst destruction {worst_kind} {float(kinds.min()):.0%} (need >= "
            f"{min_kind:.0%}); worst ladder {worst_ladder} rho {rho:.2f} (need >= {min_rho})")
    return ok, text


def overfit_table(tune: AuditResult, report: AuditResult) -> pd.DataFrame:
    """The overfit check: fused pass fraction per destruction (and ``all``) and fused ladder rho per
    kind (``rho <kind>``), tune photos next to report photos, and report minus tune."""
    def column(result: AuditResult) -> pd.Series:
        ladders = result.ladder_summary[FUSED] if len(result.ladder_summary) else pd.Series(dtype=float)
        return pd.concat([result.pass_table[FUSED], ladders.rename(lambda k: f"rho {k}")])

    table = pd.DataFrame({"tune": column(tune), "report": column(report)})
    return table.assign(gap=table["report"] - table["tune"])
