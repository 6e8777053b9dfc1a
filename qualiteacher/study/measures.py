"""What a study measures on the held-out test split, for every restorer, with the FULL ensemble.

Training graded pseudo-labels with the ensemble minus a held-out member; here every member scores
the outputs. Per restorer: PSNR / SSIM and colour fidelity (``colour_corr``, ``delta_e``:
`eval.colour`) against the ground truth, ``fused`` (the training members' fusion: what training
optimised), ``fused_all`` (every member), each member's normalised
(``norm_<m>``) and raw (``raw_<m>``) score, ``heldout`` (the held-out member's normalised score:
the out-of-reward check), and for a level-conditioned student the level dial: Spearman rho of the
requested level against the mean ``fused`` (``rho``) and the held-out member (``rho_heldout``);
``clean_psnr`` / ``clean_ssim``: the restorer given the clean ground truth as input (do no harm).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import Tensor, nn

from qualiteacher.eval.nriqa import NORM_PREFIX, level_spearman, score_levels
from qualiteacher.eval.report import evaluate_restorers, summary_table

TestImage = tuple[str, Tensor, Tensor | None]  # (id, lq (3, H, W), gt (3, H, W) or None)


class Dial(NamedTuple):
    rho: float                # Spearman(level, mean fused of the training members)
    rho_heldout: float        # Spearman(level, mean held-out member score); NaN without one
    level_means: list[float]  # mean fused per level
    span_px: float = float("nan")  # mean |output(last level) - output(first level)| in 8-bit steps


def training_weights(ensemble: nn.Module, held_out: str | None) -> dict[str, float]:
    """Member -> weight of the fusion training used (every member but ``held_out``)."""
    return {s.name: float(s.weight) for s in ensemble.specs if s.name != held_out}


def fuse_columns(frame: pd.DataFrame, weights: Mapping[str, float]) -> pd.Series:
    """Weighted mean of the ``norm_<member>`` columns, weights renormalised (as the ensemble fuses)."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"fuse_columns: weights {dict(weights)} sum to {total}")
    return sum(frame[NORM_PREFIX + name] * (w / total) for name, w in weights.items())


def _with_study_columns(frame: pd.DataFrame, ensemble: nn.Module, held_out: str | None) -> pd.DataFrame:
    frame = frame.drop(columns=["iqa_level"], errors="ignore")
    frame["fused_all"] = frame["fused"]
    frame["fused"] = fuse_columns(frame, training_weights(ensemble, held_out))
    frame["heldout"] = frame[NORM_PREFIX + held_out] if held_out else float("nan")
    return frame


def measure_restorers(restorers: Mapping[str, Callable[[Tensor], Tensor]], test: Sequence[TestImage],
                      ensemble: nn.Module, held_out: str | None,
                      device: torch.device | str = "cpu") -> pd.DataFrame:
    """One row per restorer (index ``restorer``): the means over ``test`` of the columns above, and
    ``clean_psnr`` / ``clean_ssim``: the restorer given the ground truth itself as input (do no
    harm; NaN for ``input``)."""
    per_image = evaluate_restorers(restorers, test, ensemble, device=device)
    table = summary_table(_with_study_columns(per_image, ensemble, held_out))
    clean = [(i, gt, gt) for i, _, gt in test if gt is not None]
    chosen = {k: fn for k, fn in restorers.items() if k != "input"}
    table["clean_psnr"] = table["clean_ssim"] = float("nan")
    if clean and chosen:
        means = evaluate_restorers(chosen, clean, ensemble, device=device).groupby("restorer")[["psnr", "ssim"]].mean()
        table["clean_psnr"] = means["psnr"].reindex(table.index)
        table["clean_ssim"] = means["ssim"].reindex(table.index)
    return table


def level_dial(student: nn.Module, test: Sequence[TestImage], ensemble: nn.Module, held_out: str | None,
               tile: int | None = None, levels: Sequence[int] = range(8),
               device: torch.device | str = "cpu") -> Dial:
    """Score the student's outputs at every level in ``levels`` (quality control of the dial)."""
    images = [lq.to(device) for _, lq, _ in test]
    frame = score_levels(student, images, ensemble, levels=levels, tile=tile, ids=[i for i, _, _ in test])
    frame = _with_study_columns(frame, ensemble, held_out)
    means = frame.groupby("level")["fused"].mean()
    rho_h = level_spearman(frame, "heldout") if held_out else float("nan")
    span = float(frame.loc[frame["level"] == list(levels)[-1], "px_from_first"].mean())
    return Dial(level_spearman(frame, "fused"), rho_h, [round(float(v), 5) for v in means.to_numpy()], span)


def dial_columns(dial: Dial | None) -> dict[str, Any]:
    """The dial as row columns (NaN for an unconditioned student)."""
    if dial is None:
        return {"rho": float("nan"), "rho_heldout": float("nan"), "level_means": "", "dial_px": float("nan")}
    return {"rho": dial.rho, "rho_heldout": dial.rho_heldout, "level_means": json.dumps(dial.level_means),
            "dial_px": dial.span_px}
