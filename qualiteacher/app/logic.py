"""The app's work, without a browser: read an upload, restore it, score it, sweep the levels.

Everything here is a plain function on tensors and files; ``ui.py`` only wires these to widgets.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from qualiteacher.app.model import AppModel

LEVELS: tuple[int, ...] = tuple(range(8))
MAX_PIXELS = 40_000_000       # uploads above this (read from the header, before decoding) are refused
AUTO_TILE_SIDE = 512          # images with a longer side are restored in tiles of this size
SCORE_SIDE = 512              # outputs are scored on a copy whose longer side is at most this
SWEEP_SIDE = 384              # the level sweep runs on a copy whose longer side is at most this


class UploadError(ValueError):
    """An upload the app cannot use; the message is shown in the page as it is."""


class Restored(NamedTuple):
    image: Tensor        # (1, 3, H, W) in [0, 1]
    seconds: float
    tile: int | None     # tile size used, None when untiled
    label: str           # "student at level 7, w 1.0" / "teacher"


class ScoreTable(NamedTuple):
    """Scores of a few images (columns), every member's raw and normalised score plus the fused one."""

    names: list[str]                          # column names, e.g. ["input", "output"]
    fused: list[float]
    level: list[int]
    members: dict[str, tuple[list[float], list[float], float]]  # member -> (raw, normalised, weight)
    scored_side: int                          # longer side of the scored copies


class Sweep(NamedTuple):
    images: list[np.ndarray]   # (H, W, 3) uint8: the image at every level
    captions: list[str]        # "level 3 · 0.612": each level with its fused score
    table: ScoreTable          # one column per level
    seconds: float


def read_upload(path: str | Path | None, max_pixels: int = MAX_PIXELS) -> Tensor:
    """An uploaded file as a (1, 3, H, W) float tensor in [0, 1]; any Pillow mode (16-bit, CMYK,
    palette, alpha over white). Raises :class:`UploadError` with a message for the page."""
    from qualiteacher.data.io import ImageReadError, read_image, to_tensor

    if not path:
        raise UploadError("Upload an image or pick an example first.")
    path = Path(path)
    try:
        with warnings.catch_warnings():  # our own pixel cap below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # header only: the size before any pixel is decoded
                w, h = im.size
    except Exception as err:  # noqa: BLE001  Pillow raises many kinds for foreign files
        raise UploadError(f"{path.name}: not an image this app can read ({type(err).__name__}: {err})") from None
    if w * h > max_pixels:
        raise UploadError(f"{path.name}: {w}×{h} px ({w * h / 1e6:.0f} MP) is larger than this app takes "
                          f"({max_pixels / 1e6:.0f} MP); downscale it first, or use `qualiteacher restore`.")
    try:
        image = read_image(path)
    except ImageReadError as err:
        raise UploadError(f"{path.name}: {err.reason}") from None
    x = to_tensor(image)[None]
    if not torch.isfinite(x).all():
        raise UploadError(f"{path.name}: the pixel data holds NaN or infinite values")
    if min(x.shape[-2:]) < 8:
        raise UploadError(f"{path.name}: {x.shape[-1]}×{x.shape[-2]} px is too small (at least 8 px a side)")
    return x


class _Conditioned(nn.Module):
    """``restore`` calls ``model(x, level)``; this adds the per-image levels of a batch and ``w``."""

    def __init__(self, net: nn.Module, levels: Tensor | None, w: float | None) -> None:
        super().__init__()
        self.net, self.levels, self.w = net, levels, w

    def forward(self, x: Tensor, level: Tensor | None, w: float | None = None) -> object:
        # ``w`` from ``restore`` is ignored: this wrapper's own ``w`` is passed (only when set)
        if self.levels is not None:  # tiles of every image come in image order, one group per tile
            level = self.levels.to(x.device).repeat(x.shape[0] // self.levels.numel())
        if self.w is None:
            return self.net(x, level)
        return self.net(x, level, w=self.w)


def pick_tile(image: Tensor, tile: int | None) -> int | None:
    """``tile`` if given (0: never tile), else :data:`AUTO_TILE_SIDE` above that size."""
    if tile is not None:
        return tile or None
    return AUTO_TILE_SIDE if max(image.shape[-2:]) > AUTO_TILE_SIDE else None


def restore_image(model: AppModel, x: Tensor, level: int = 7, w: float | None = None,
                  teacher: bool = False, tile: int | None = None) -> Restored:
    """Restore ``x`` (1, 3, H, W) with the student at ``level`` (and fidelity ``w`` when the student
    has the fidelity path; ignored otherwise), or with the unconditioned teacher."""
    from qualiteacher.training.restore import restore

    if teacher and model.teacher is None:
        raise UploadError("This model has no teacher (a registered student): untick 'teacher'.")
    if not 0 <= level <= max(LEVELS):
        raise UploadError(f"quality level must lie in 0..{max(LEVELS)}, got {level}")
    net = model.teacher if teacher else model.student
    w = w if model.has_fidelity else None
    device = next(net.parameters()).device
    used = pick_tile(x, tile)
    start = time.perf_counter()
    y = restore(_Conditioned(net, None, w), x.to(device), level=None if teacher else int(level), tile=used)
    seconds = time.perf_counter() - start
    label = "teacher" if teacher else f"student at level {level}" + ("" if w is None else f", w {w:g}")
    return Restored(y.float().cpu(), seconds, used, label)


def fit_side(images: Tensor, side: int) -> Tensor:
    """Bilinear (antialiased) downscale so the longer side is at most ``side``."""
    h, w = images.shape[-2:]
    if max(h, w) <= side:
        return images
    s = side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def score_images(ensemble: nn.Module, images: Tensor, names: list[str], side: int = SCORE_SIDE) -> ScoreTable:
    """Score a batch (B, 3, H, W) with the IQA ensemble in one call, on copies no larger than ``side``."""
    small = fit_side(images, side)
    device = next((b.device for b in ensemble.buffers()), torch.device("cpu"))
    s = ensemble(small.to(device))
    weights = ensemble.weights
    members = {k: (s.raw[k].cpu().tolist(), s.normalized[k].cpu().tolist(), float(weights[k])) for k in s.raw}
    return ScoreTable(list(names), s.fused.cpu().tolist(), s.level.cpu().tolist(), members, max(small.shape[-2:]))


def level_sweep(model: AppModel, ensemble: nn.Module, x: Tensor, w: float | None = None,
                levels: tuple[int, ...] = LEVELS, side: int = SWEEP_SIDE, tile: int | None = None) -> Sweep:
    """The student at every level on a copy of ``x`` no larger than ``side``: one batched restore,
    one batched scoring call; each level's image with its fused score as caption."""
    from qualiteacher.training.restore import restore

    start = time.perf_counter()
    small = fit_side(x, side)
    lv = torch.tensor(levels, dtype=torch.long)
    w = w if model.has_fidelity else None
    device = next(model.student.parameters()).device
    batch = small.to(device).expand(len(levels), -1, -1, -1)           # (L, 3, H, W)
    out = restore(_Conditioned(model.student, lv, w), batch, level=None, tile=pick_tile(small, tile)).float().cpu()
    table = score_images(ensemble, out, [f"level {q}" for q in levels])
    captions = [f"level {q} · {f:.3f}" for q, f in zip(levels, table.fused)]
    return Sweep([to_uint8(o) for o in out], captions, table, time.perf_counter() - start)


def score_markdown(table: ScoreTable) -> str:
    """The score table as Markdown: fused score and level first, then every member (raw → normalised)."""
    head = "| | " + " | ".join(table.names) + " |\n|---|" + "---|" * len(table.names) + "\n"
    rows = ["| **fused** (higher is better) | " + " | ".join(f"**{v:.3f}**" for v in table.fused) + " |",
            "| IQA level (0..7) | " + " | ".join(str(int(v)) for v in table.level) + " |"]
    for name, (raw, norm, weight) in table.members.items():
        cells = " | ".join(f"{n:.3f} ({_short(r)})" for r, n in zip(raw, norm))
        rows.append(f"| {name} × {weight:g} | {cells} |")
    note = f"\n\nMembers: normalised score (raw score); scored at {table.scored_side} px on the longer side."
    return head + "\n".join(rows) + note


def _short(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def to_uint8(image: Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) in [0, 1] -> (H, W, 3) uint8 for display."""
    im = image[0] if image.ndim == 4 else image
    return (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
