"""Figures: comparison grids of images and the "ensemble score versus requested level" plot.

Everything renders off-screen with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from qualiteacher.eval.nriqa import NORM_PREFIX


def _cell(image: Tensor | None, height: int, width: int, fill: float) -> Tensor:
    if image is None:
        return torch.full((3, height, width), fill)
    im = image.detach().float().cpu()
    if im.ndim == 4 and im.shape[0] == 1:
        im = im[0]
    if im.ndim != 3 or im.shape[0] not in (1, 3):
        raise ValueError(f"image_grid: each cell must be (3, H, W) or (1, H, W), got {tuple(image.shape)}")
    if im.shape[0] == 1:
        im = im.expand(3, -1, -1)
    if im.shape[-2:] != (height, width):
        im = F.interpolate(im[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]
    return im.clamp(0, 1)


def _title_strip(titles: Sequence[str], width: int, cell_width: int, gap: int, height: int) -> np.ndarray:
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    for j, title in enumerate(titles):
        centre = (j * (cell_width + gap) + cell_width / 2) / width
        fig.text(centre, 0.5, title, ha="center", va="center", fontsize=max(6, min(12, height * 0.45)))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:height, :width, :3].copy()


def image_grid(rows: Sequence[Sequence[Tensor | None]], titles: Sequence[str] | None = None,
               cell_size: tuple[int, int] | None = None, gap: int = 2, title_height: int = 24) -> np.ndarray:
    """Tile images into a grid, returned as a ``uint8`` array ``(H, W, 3)``.

    ``rows`` holds one list of cells per row (e.g. input | teacher PL | student at several levels |
    ground truth); each cell is a ``(3, H, W)`` tensor in [0, 1], or ``None`` for a blank cell
    (a missing reference). Short rows are padded with blanks. Every cell is resized (bilinear,
    antialiased) to ``cell_size`` ``(height, width)``, by default the first cell's size. With
    ``titles`` (one per column) a strip of ``title_height`` px on top names the columns. Cells are
    separated by ``gap`` white pixels.
    """
    if not rows or not any(rows):
        raise ValueError("image_grid: no image given")
    ncols = max(len(r) for r in rows)
    if titles is not None and len(titles) != ncols:
        raise ValueError(f"image_grid: {len(titles)} titles for {ncols} columns")
    if cell_size is None:
        first = next(c for r in rows for c in r if c is not None)
        cell_size = tuple(first.shape[-2:])
    ch, cw = cell_size
    height = len(rows) * ch + (len(rows) - 1) * gap
    width = ncols * cw + (ncols - 1) * gap
    canvas = torch.ones(3, height, width)
    for i, row in enumerate(rows):
        for j in range(ncols):
            cell = _cell(row[j] if j < len(row) else None, ch, cw, fill=0.5)
            y, x = i * (ch + gap), j * (cw + gap)
            canvas[:, y:y + ch, x:x + cw] = cell
    grid = (canvas.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    if titles is not None:
        grid = np.concatenate([_title_strip(titles, width, cw, gap, title_height), grid], axis=0)
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a ``uint8`` ``(H, W, 3)`` array as PNG, creating parent folders; returns the path."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"save_png: expected a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def plot_score_vs_level(df: pd.DataFrame, path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot mean fused score ± std per requested level, plus one line per member's normalised score.

    ``df`` is `score_levels`'s frame (columns ``level``, ``fused``, ``norm_<member>``). Saves a PNG.
    """
    for name in ("level", "fused"):
        if name not in df.columns:
            raise KeyError(f"plot_score_vs_level: column {name!r} missing (have {list(df.columns)})")
    members = [c for c in df.columns if c.startswith(NORM_PREFIX)]
    grouped = df.groupby("level")
    mean, std = grouped["fused"].mean(), grouped["fused"].std(ddof=0)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    levels = mean.index.to_numpy()
    ax.plot(levels, mean.to_numpy(), "o-", color="black", linewidth=2, label="fused (mean ± std)")
    ax.fill_between(levels, (mean - std).to_numpy(), (mean + std).to_numpy(), color="black", alpha=0.15)
    for column in members:
        ax.plot(levels, grouped[column].mean().to_numpy(), ".--", label=column[len(NORM_PREFIX):])
    ax.set_xlabel("requested quality level")
    ax.set_ylabel("normalised score (higher = better)")
    ax.set_xticks(levels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
