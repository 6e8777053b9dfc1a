"""Choosing member weights and ranges on the audit's tune photos: score once, re-fuse many times.

``raw_scores`` runs a superset of members over every image the audit needs (clean sources, every
destruction, the untrained student, the ladders of every task and the generic ones) and keeps the
raw scores in one long table; ``evaluate`` fuses any member set (weights, ranges, directions)
from it without scoring again and returns the audit's figures: pass fraction per destruction and
mean ladder rho per kind. Only tune rows should drive a choice; ``evaluate`` on report rows is the
check (docs/iqa.md "Tune and report photos").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from qualiteacher.data.degradations import degrade_ladder, generic_ladder
from qualiteacher.iqa.audit import UNTRAINED, AuditImages, StudentOutputs, square_crops
from qualiteacher.iqa.audit_photos import AUDIT_CROPS, catalogue_photos
from qualiteacher.iqa.colour import fit_hue_prior
from qualiteacher.iqa.destruction import DESTRUCTIONS
from qualiteacher.iqa.ensemble import Ensemble
from qualiteacher.iqa.guards import fuse_available
from qualiteacher.iqa.members import MemberSpec, normalize_score
from qualiteacher.iqa.offline import load_skimage_photos
from qualiteacher.iqa.sanity import GENERIC_KINDS, LADDER_STRENGTHS

SOURCE = "source"


def _ladder_batch(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    strengths = LADDER_STRENGTHS[1:]
    lad = generic_ladder(image, kind, strengths, seed) if kind in GENERIC_KINDS else \
        degrade_ladder(image, kind, strengths, seed=seed)
    return np.stack(lad)


def raw_scores(ensemble: Ensemble, images: AuditImages, split: str, ladder_kinds: Sequence[str],
               seed: int = 0, batch: int = 64, student_outputs: StudentOutputs | None = None) -> pd.DataFrame:
    """Raw member scores (long table: split, image, case, strength, changed, member, raw) of the
    sources, every destruction, the untrained student (``student_outputs``, when given) and the
    ``ladder_kinds`` ladders."""
    x = images.images
    cases: list[tuple[str, float, torch.Tensor, np.ndarray]] = [(SOURCE, 0.0, x, np.ones(len(x), bool))]
    outputs = {kind: fn(x, seed) for kind, fn in DESTRUCTIONS.items()}
    if student_outputs is not None:
        outputs[UNTRAINED] = student_outputs(x, seed)
    for kind, y in outputs.items():
        cases.append((kind, 1.0, y, (y - x).flatten(1).abs().amax(1).gt(1 / 512).numpy()))
    arrays = [im.permute(1, 2, 0).numpy() for im in x]
    for kind in ladder_kinds:
        lads = np.stack([_ladder_batch(a, kind, seed) for a in arrays], 1)  # (S, N, H, W, 3)
        for s, strength in enumerate(LADDER_STRENGTHS[1:]):
            y = torch.from_numpy(lads[s]).permute(0, 3, 1, 2).float().contiguous()
            cases.append((f"ladder:{kind}", float(strength), y, np.ones(len(x), bool)))
    rows = []
    for case, strength, y, changed in cases:
        raw = {s.name: [] for s in ensemble.specs}
        for i in range(0, len(y), batch):
            got = ensemble(y[i : i + batch]).raw
            for name in raw:
                raw[name].append(got[name].detach().cpu().double())
        for name, parts in raw.items():
            values = torch.cat(parts).numpy()
            rows.append(pd.DataFrame({"split": split, "image": images.names, "case": case, "strength": strength,
                                      "changed": changed, "member": name, "raw": values}))
    return pd.concat(rows, ignore_index=True)


def fuse(raw: pd.DataFrame, specs: Sequence[MemberSpec]) -> pd.DataFrame:
    """Fused score per (split, image, case, strength) of the member set ``specs`` (each name must
    have raw scores in ``raw``), with the ensemble's rules (range normalisation, weights
    renormalised over the members that scored the image). Columns: the index keys, changed, fused."""
    keys = ["split", "image", "case", "strength", "changed"]
    wide = raw.set_index([*keys, "member"])["raw"].unstack("member")
    missing = [s.name for s in specs if s.name not in wide.columns]
    if missing:
        raise KeyError(f"no raw scores for members {missing}; have {list(wide.columns)}")
    normalized = {s.name: normalize_score(torch.tensor(wide[s.name].to_numpy(float)), s.normalization,
                                          s.higher_better) for s in specs}
    fused = fuse_available(normalized, {s.name: s.weight for s in specs})
    return wide.index.to_frame(index=False).assign(fused=fused.numpy())


def evaluate(fused: pd.DataFrame, split: str) -> tuple[pd.Series, pd.Series]:
    """(pass fraction per destruction plus ``all``, mean ladder rho per kind) of one split: a pair
    passes when the destroyed image's fused score is strictly below its source's (NaN fails)."""
    f = fused[fused["split"] == split]
    src = f[f["case"] == SOURCE].set_index("image")["fused"]
    is_ladder = f["case"].str.startswith("ladder:")
    pairs = f[~is_ladder & (f["case"] != SOURCE) & f["changed"]]
    ok = pairs["fused"].to_numpy() < src.reindex(pairs["image"]).to_numpy()
    passes = pd.Series(ok, index=pairs["case"].to_numpy()).groupby(level=0, sort=False).mean()
    passes.loc["all"] = ok.mean()
    rhos = {}
    for kind in f.loc[is_ladder, "case"].unique():
        lad = f[f["case"] == kind].pivot_table(index="image", columns="strength", values="fused")
        lad.insert(0, 0.0, src.reindex(lad.index))
        vals = [-spearmanr(lad.columns, row)[0] if np.ptp(row) > 0 else 0.0 for row in lad.to_numpy()]
        rhos[kind.split(":", 1)[1]] = float(np.mean(vals))
    return passes, pd.Series(rhos)


def fit_default_hue_prior(size: int = 96) -> torch.Tensor:
    """``colour.HUE_PRIOR`` as fitted: the tune photos of the catalogue plus scikit-image's
    astronaut and coffee, every audit crop at ``size`` px."""
    photos = list(catalogue_photos("tune").values())
    photos += [(p * 255).round().astype(np.uint8) for p in load_skimage_photos(["astronaut", "coffee"])]
    crops = [c for p in photos for c in square_crops(p, size, AUDIT_CROPS)]
    return fit_hue_prior(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float())
