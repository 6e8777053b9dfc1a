"""No-reference IQA of a quality-conditioned student: ensemble scores versus the requested level.

`score_levels` restores the same images at every requested level and scores each output with the
IQA ensemble; `level_spearman` is the quality-control check on the result (a student that honours
its conditioning has mean scores rising with the level, so rho close to 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from qualiteacher.training.restore import restore

NORM_PREFIX = "norm_"
RAW_PREFIX = "raw_"


def scores_frame(scores: Any) -> pd.DataFrame:
    """One row per image of an ``EnsembleScores``: ``fused``, ``iqa_level``, ``norm_<member>``, ``raw_<member>``."""
    columns: dict[str, Any] = {
        "fused": scores.fused.detach().float().cpu().numpy(),
        "iqa_level": scores.level.detach().cpu().numpy().astype("int64"),
    }
    for name, value in scores.normalized.items():
        columns[NORM_PREFIX + name] = value.detach().float().cpu().numpy()
    for name, value in scores.raw.items():
        columns[RAW_PREFIX + name] = value.detach().float().cpu().numpy()
    return pd.DataFrame(columns)


def score_levels(model: nn.Module, images: Tensor | Sequence[Tensor], ensemble: Callable[[Tensor], Any],
                 levels: Iterable[int] = range(8), tile: int | None = None,
                 ids: Sequence[str] | None = None, w: float | None = None) -> pd.DataFrame:
    """Score ``model``'s restorations of ``images`` at every level in ``levels``.

    ``images`` is a batch ``(B, 3, H, W)`` in [0, 1] (restored and scored as one batch per level)
    or a sequence of ``(3, H, W)`` / ``(1, 3, H, W)`` tensors of different sizes (one at a time).
    ``ensemble(images)`` must return an ``EnsembleScores`` and live on the images' device; ``tile``
    and ``w`` (fidelity; ``None``: the model's default) are passed to `restore`. Returns one row per image and level with columns ``id``, ``level``
    (requested), ``fused``, ``iqa_level`` (the ensemble's level of the output), ``norm_<member>``
    and ``raw_<member>``, and ``px_from_first`` (mean absolute difference, in 8-bit steps, between
    the output and the same image's output at the first requested level: how visibly the dial moves).
    """
    levels = [int(lv) for lv in levels]
    if not levels:
        raise ValueError("score_levels: no level requested")
    batches = [images] if isinstance(images, Tensor) else [im if im.ndim == 4 else im.unsqueeze(0) for im in images]
    for b in batches:
        if b.ndim != 4 or b.shape[1] != 3:
            raise ValueError(f"score_levels: expected (B, 3, H, W) images, got {tuple(b.shape)}")
    n = sum(b.shape[0] for b in batches)
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"score_levels: {len(ids)} ids for {n} images")
    frames = []
    first: list[Tensor] = []  # the first level's outputs, per batch
    for level in levels:
        start = 0
        for k, batch in enumerate(batches):
            with torch.no_grad():
                out = restore(model, batch, level=level, tile=tile, w=w)
                scores = ensemble(out)
            if len(first) <= k:
                first.append(out)
            frame = scores_frame(scores)
            # how far this level moves the picture from the first level's: mean |difference| in 8-bit steps
            frame["px_from_first"] = ((out - first[k]).abs().flatten(1).mean(1) * 255).cpu().numpy()
            frame.insert(0, "level", level)
            frame.insert(0, "id", ids[start:start + batch.shape[0]])
            frames.append(frame)
            start += batch.shape[0]
    return pd.concat(frames, ignore_index=True)


def level_spearman(df: pd.DataFrame, column: str = "fused") -> float:
    """Spearman rho between the requested ``level`` and the mean of ``column`` at that level.

    NaN when fewer than two levels are present or the means are all equal (no ordering).
    """
    for name in ("level", column):
        if name not in df.columns:
            raise KeyError(f"level_spearman: column {name!r} missing (have {list(df.columns)})")
    means = df.groupby("level")[column].mean()
    if len(means) < 2 or means.nunique() < 2:
        return float("nan")
    return float(spearmanr(means.index.to_numpy(), means.to_numpy()).statistic)
