"""Degradation-ladder sanity check of an ensemble: do scores fall as degradation grows?"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.stats import spearmanr

from qualiteacher.data.degradations import degrade_ladder, generic_ladder
from qualiteacher.iqa.ensemble import Ensemble
from qualiteacher.iqa.offline import NIQE_FIT_PHOTOS, load_skimage_photos

LADDER_STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
GENERIC_KINDS: tuple[str, ...] = ("blur", "noise", "jpeg")
HELD_OUT_PHOTOS: tuple[str, ...] = ("rocket", "chelsea", "grace_hopper")


def held_out_photos(size: int = 96, names: Sequence[str] = HELD_OUT_PHOTOS) -> list[np.ndarray]:
    """Centre square crops of photos the NIQE fit does not use, area-resized to ``size``."""
    import matplotlib  # lazy: matplotlib only for the path of its grace_hopper photo

    if set(names) & set(NIQE_FIT_PHOTOS):
        raise ValueError(f"held-out photos {names} overlap the NIQE fit photos {NIQE_FIT_PHOTOS}")
    out = []
    for name in names:
        if name == "grace_hopper":
            path = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
            img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        else:
            img = load_skimage_photos([name])[0]
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        pil = Image.fromarray((crop * 255).round().astype(np.uint8)).resize((size, size), Image.BOX)
        out.append(np.asarray(pil, dtype=np.float32) / 255.0)
    return out


def ladder_table(
    ensemble: Ensemble,
    images: Sequence[np.ndarray],
    kinds: Sequence[str],
    strengths: Sequence[float] = LADDER_STRENGTHS,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman rho between strength and score (sign flipped: 1 = score falls with strength).

    ``kinds`` are task names (``degrade_ladder``) or generic kinds (``generic_ladder``). One row
    per (kind, image, scorer) where scorer is a member name (normalised score) or ``fused``; all
    ladders of one image are scored in one batch.
    """
    rows = []
    for i, image in enumerate(images):
        ladders = [
            generic_ladder(image, k, strengths, seed) if k in GENERIC_KINDS else degrade_ladder(image, k, strengths, seed=seed)
            for k in kinds
        ]
        batch = torch.from_numpy(np.stack([im for lad in ladders for im in lad])).permute(0, 3, 1, 2).float()
        scores = ensemble(batch)
        series = {**scores.normalized, "fused": scores.fused}
        n = len(strengths)
        for j, kind in enumerate(kinds):
            for name, values in series.items():
                v = values[j * n : (j + 1) * n].cpu().numpy()
                rho = -spearmanr(strengths, v)[0] if np.ptp(v) > 0 else 0.0
                rows.append({"kind": kind, "image": i, "scorer": name, "rho": float(rho)})
    return pd.DataFrame(rows)


def ladder_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean rho per kind (rows) and scorer (columns), ``fused`` last."""
    pivot = table.pivot_table(index="kind", columns="scorer", values="rho", aggfunc="mean", sort=False)
    cols = [c for c in pivot.columns if c != "fused"] + ["fused"]
    return pivot[cols]
