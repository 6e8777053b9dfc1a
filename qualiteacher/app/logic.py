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
from PIL import Image
from torch import Tensor, nn

from qualiteacher.app.model import AppModel
from qualiteacher.data.io import ImageReadError, read_image, to_tensor
from qualiteacher.iqa.bounded import fit_side
from qualiteacher.training.restore import auto_tile, restore

LEVELS: tuple[int, ...] = tuple(range(8))
MAX_PIXELS = 40_000_000       # uploads above this (read from the header, before decoding) are refused
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


def pick_tile(image: Tensor, tile: int | None, net: nn.Module | None = None) -> int | None:
    """The tile side ``restore`` uses for ``image`` with ``net``: ``tile`` if given (0: never
    tile), else the architecture's (``default_tile``); ``None`` when the image runs whole."""
    return auto_tile(image, tile, net)


def check_dials(model: AppModel, level: int, w: float | None) -> None:
    """:class:`UploadError` unless ``level`` lies in 0..top level and ``w`` (when given) in [0, 1]:
    what the sliders allow, checked again for callers of the API."""
    top = min(int(model.top_level), max(LEVELS))
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= top:
        raise UploadError(f"quality level must be an integer in 0..{top}, got {level!r}")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))
                          or not math.isfinite(w) or not 0.0 <= w <= 1.0):
        raise UploadError(f"fidelity weight w must lie in [0, 1], got {w!r}")


def restore_image(model: AppModel, x: Tensor, level: int = 7, w: float | None = None,
                  teacher: bool = False, tile: int | None = None) -> Restored:
    """Restore ``x`` (1, 3, H, W) with the student at ``level`` (and fidelity ``w`` in [0, 1] when
    the student has the fidelity path; ignored otherwise), or with the unconditioned teacher, in
    tiles under the machine's memory budget (``qualiteacher.training.restore.restore``)."""
    if teacher and model.teacher is None:
        raise UploadError("This model has no teacher (a registered student): untick 'teacher'.")
    check_dials(model, level, w)
    net = model.teacher if teacher else model.student
    w = w if model.has_fidelity else None
    start = time.perf_counter()
    y = restore(net, x, level=None if teacher else int(level), tile=tile, w=w)
    seconds = time.perf_counter() - start
    label = "teacher" if teacher else f"student at level {level}" + ("" if w is None else f", w {w:g}")
    return Restored(y.float().cpu(), seconds, pick_tile(x, tile, net), label)


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
    for q in levels:
        check_dials(model, q, w)
    start = time.perf_counter()
    small = fit_side(x, side)
    w = w if model.has_fidelity else None
    batch = small.expand(len(levels), -1, -1, -1)                       # (L, 3, H, W), one level each
    out = restore(model.student, batch, level=torch.tensor(levels, dtype=torch.long), tile=tile, w=w).float().cpu()
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
