"""Tiled inference under a memory budget: tile grid, seamless blending, batches sized to the budget.

An image is cut into tiles that overlap by at least ``overlap`` px, spread evenly (so no tile is
wasted on a sliver at the border); each tile's output is weighted by raised-cosine ramps over its
overlaps, which sum to one across every overlap, and normalised by the summed weights, so no seam
is left. Rows of output are written once every tile above them is in, so only a band of a few
tile heights is held in float32, and the image stays in its own dtype (uint8 from a photo) until
a tile is cut from it. How many tiles go through the model at once follows from the budget: the
model's bytes per pixel are measured on a small probe tile (:func:`~qualiteacher.training.memory.measure_peak`)
and scaled to the tile, with a margin for what the allocator and the kernels add.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.training.memory import MemoryBudgetError, describe, measure_peak

MAX_TILES = 64        # tiles per batch at most, whatever the budget (no speed is gained past this)
CPU_BATCH_PIXELS = 1 << 17  # on CPU, larger batches run slower per pixel (they leave the caches)
PROBE_SIDE = 64       # side of the probe tile whose memory is measured (at least twice the model's multiple)
RSS_MARGIN = 2.0      # process memory / tensor memory of a first forward pass on CPU: 1.17-2.02 measured
CUDA_MARGIN = 1.5     # cuDNN workspaces and the caching allocator's rounding (not yet measured on a GPU)

# model -> {(images per position, device): bytes per pixel}: each model is probed once per process
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TileGrid(NamedTuple):
    """Tiles of ``tile`` (th, tw) px at every (y, x) of ``ys`` x ``xs``; where the image is
    smaller than a tile along an axis, the tile is padded and its output cropped back."""

    tile: tuple[int, int]
    ys: list[int]
    xs: list[int]
    size: tuple[int, int]  # (H, W) of the image


def axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of tiles of ``tile`` px covering ``size`` px, neighbours overlapping
    by at least ``overlap`` px."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def fit_tile(size: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The tile side (at most ``tile``, a multiple of ``multiple``) that covers ``size`` px with as
    few tiles as ``tile`` needs and the least overlap beyond ``overlap``: a 1000-px side takes 3
    tiles of 352 px rather than 3 of 512 (the time per pixel then barely depends on the size)."""
    if size <= tile:
        return min(tile, math.ceil(size / multiple) * multiple)
    n = math.ceil((size - overlap) / (tile - overlap))
    return min(tile, math.ceil((size + (n - 1) * overlap) / n / multiple) * multiple)


def plan_grid(h: int, w: int, tile: int, overlap: int, multiple: int = 1, fit: bool = True) -> TileGrid:
    """The tile grid of an ``h`` x ``w`` image; a side shorter than ``tile`` becomes one tile of
    that side rounded up to ``multiple``. With ``fit``, tiles are fitted to each side
    (:func:`fit_tile`) and, along a short side, grow along the other to the same area (a 20000 x 8
    strip goes in 8 x 2016 tiles); without, every other tile is ``tile`` px (e.g. the training crop)."""
    if not fit:
        th, tw = (min(tile, math.ceil(n / multiple) * multiple) for n in (h, w))
        return TileGrid((th, tw), axis_starts(h, th, overlap), axis_starts(w, tw, overlap), (h, w))
    th, tw = fit_tile(h, tile, overlap, multiple), fit_tile(w, tile, overlap, multiple)
    if th < tile and tw == tile:
        tw = fit_tile(w, max(tile, tile * tile // th // multiple * multiple), overlap, multiple)
    elif tw < tile and th == tile:
        th = fit_tile(h, max(tile, tile * tile // tw // multiple * multiple), overlap, multiple)
    return TileGrid((th, tw), axis_starts(h, th, overlap), axis_starts(w, tw, overlap), (h, w))


def _ramp(n: int, device: torch.device) -> Tensor:
    # raised cosine rising over n px; ramp(k) + ramp(n-1-k) == 1, never 0 or 1 exactly
    k = torch.arange(n, device=device, dtype=torch.float32)
    return 0.5 - 0.5 * torch.cos(math.pi * (k + 0.5) / n)


def axis_weights(starts: list[int], tile: int, size: int, device: torch.device) -> tuple[list[Tensor], Tensor]:
    """Blending weights of each tile along one axis (over its part inside the image) and their
    sum over the axis (``size``,): ramps over each overlap with a neighbour, 1 elsewhere."""
    span = min(tile, size)
    weights, total = [], torch.zeros(size, device=device)
    for i, s in enumerate(starts):
        wt = torch.ones(span, device=device)
        if i > 0:
            o = starts[i - 1] + span - s
            wt[:o] *= _ramp(o, device)
        if i + 1 < len(starts):
            o = s + span - starts[i + 1]
            wt[span - o:] *= _ramp(o, device).flip(0)
        weights.append(wt)
        total[s:s + span] += wt
    return weights, total


def plan_batch(bytes_per_position: float, budget: int, fixed: int, max_positions: int = MAX_TILES) -> int:
    """How many tile positions fit in ``budget`` bytes beside ``fixed`` bytes (at least one;
    :class:`MemoryBudgetError` when not even one fits)."""
    room = budget - fixed
    if room < bytes_per_position:
        raise MemoryBudgetError(f"needs about {describe(fixed + bytes_per_position)} (image "
                                f"{describe(fixed)} + one tile {describe(bytes_per_position)}), over the "
                                f"memory budget of {describe(budget)}: raise --max-memory, or use a smaller --tile")
    return int(max(1, min(max_positions, room // bytes_per_position)))


def _cut(image: Tensor, y: int, x: int, grid: TileGrid, device: torch.device) -> Tensor:
    th, tw = grid.tile
    t = image[..., y:y + th, x:x + tw].to(device)
    t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
    ph, pw = th - t.shape[-2], tw - t.shape[-1]
    t = F.pad(t, (0, pw, 0, ph), mode="replicate") if ph or pw else t
    # channels last: the CPU's convolutions run ~15 % faster on it (no change to the model)
    return t.contiguous(memory_format=torch.channels_last) if device.type == "cpu" else t


def bytes_per_pixel(fn: Callable[[Tensor], Tensor], image: Tensor, grid: TileGrid, device: torch.device,
                    probe_side: int, key: object | None) -> float:
    """The memory of ``fn`` per tile pixel (all images of the batch together), measured on a
    probe tile and remembered for ``key`` (a model), with the margin of the device."""
    memo = _PROBED.setdefault(key, {}) if key is not None else {}
    slot = (image.shape[0], str(device))
    if slot not in memo:
        ph, pw = min(grid.tile[0], probe_side), min(grid.tile[1], probe_side)
        probe = _cut(image, 0, 0, TileGrid((ph, pw), [0], [0], grid.size), device)
        _, peak = measure_peak(fn, probe)
        margin = CUDA_MARGIN if device.type == "cuda" else RSS_MARGIN
        memo[slot] = margin * (peak / (ph * pw) + 4 * image.shape[0] * image.shape[1])  # + the float input
    return memo[slot]


class TilePlan(NamedTuple):
    """How an image is cut: the grid, the overlap, and how many positions go through at once."""

    grid: TileGrid
    overlap: int
    positions: int


def plan_tiles(fn: Callable[[Tensor], Tensor], image: Tensor, tile: int, overlap: int = 16,
               max_memory: int | None = None, multiple: int = 1, tiles_per_batch: int | None = None,
               device: torch.device | str | None = None, key: object | None = None,
               probe_side: int = PROBE_SIDE, fit: bool = False) -> TilePlan:
    """The :class:`TilePlan` of ``image`` (B, C, H, W): tiles of ``tile`` px (at most, fitted to
    the image with ``fit``: see :func:`plan_grid`), and as many
    positions per batch as ``max_memory`` bytes hold beside the image's buffers (``None``: no
    limit but ``tiles_per_batch`` / :data:`MAX_TILES`; on CPU also :data:`CPU_BATCH_PIXELS`);
    :class:`MemoryBudgetError` when one position does not fit. Nothing but the probe runs."""
    if tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must exceed twice the overlap ({overlap})")
    b, c, h, w = image.shape
    device = image.device if device is None else torch.device(device)
    grid = plan_grid(h, w, tile, overlap, multiple, fit)
    th, tw = grid.tile
    cap = min(tiles_per_batch or MAX_TILES, len(grid.ys) * len(grid.xs))
    if device.type == "cpu":
        cap = max(1, min(cap, CPU_BATCH_PIXELS // (th * tw * b)))
    if max_memory is not None:
        # the image in and out, the float band of rows being blended (twice while it grows) and a
        # flush's temporaries
        fixed = 2 * image.element_size() * image.numel() + 4 * b * c * 4 * th * w
        per_position = bytes_per_pixel(fn, image, grid, device, max(probe_side, 2 * multiple), key) * th * tw
        cap = plan_batch(per_position, max_memory, fixed, cap)
    return TilePlan(grid, overlap, cap)


@torch.no_grad()
def run_tiles(fn: Callable[[Tensor], Tensor], image: Tensor, plan: TilePlan,
              device: torch.device | str | None = None) -> Tensor:
    """Apply ``fn`` to ``image`` (B, C, H, W) tile by tile as ``plan`` says, blended (see the module doc).

    ``image`` may be uint8 (0..255; the result is uint8, rounded) or float (the result in its
    dtype). Tiles go to ``device`` (default: the image's) as float32 in [0, 1]; each batch holds
    the B tiles of each of several positions, position after position (what per-image
    conditioning relies on)."""
    b, c, h, w = image.shape
    device = image.device if device is None else torch.device(device)
    grid, cap = plan.grid, plan.positions
    th, tw = grid.tile
    sh, sw = min(th, h), min(tw, w)  # the part of a tile inside the image
    out = torch.empty_like(image)
    positions = [(y, x) for y in grid.ys for x in grid.xs]
    wys, norm_y = axis_weights(grid.ys, th, h, device)
    wxs, norm_x = axis_weights(grid.xs, tw, w, device)
    acc = torch.zeros((b, c, 0, w), device=device)  # rows lo.. of the output still receiving tiles
    lo = 0

    def flush(end: int) -> None:  # rows lo..end are complete: normalise, convert, store
        rows = acc[:, :, :end - lo] / (norm_y[lo:end, None] * norm_x[None, :])
        if out.dtype == torch.uint8:
            rows = (rows.clamp(0, 1) * 255).round()
        out[..., lo:end, :] = rows.to(out.device, out.dtype)

    for i in range(0, len(positions), cap):
        chunk = positions[i:i + cap]
        res = fn(torch.cat([_cut(image, y, x, grid, device) for y, x in chunk])).float()  # (n*B, C, th, tw)
        for j, (y, x) in enumerate(chunk):
            if y > lo:
                flush(y)
                acc, lo = acc[:, :, y - lo:], y
            if y + sh - lo > acc.shape[2]:
                acc = torch.cat([acc, acc.new_zeros((b, c, y + sh - lo - acc.shape[2], w))], dim=2)
            wt = wys[grid.ys.index(y)][:, None] * wxs[grid.xs.index(x)][None, :]
            acc[:, :, y - lo:y - lo + sh, x:x + sw] += res[j * b:(j + 1) * b, :, :sh, :sw] * wt
        del res
    flush(h)
    return out


def tiled_apply(fn: Callable[[Tensor], Tensor], image: Tensor, tile: int, overlap: int = 16,
                max_memory: int | None = None, multiple: int = 1, tiles_per_batch: int | None = None,
                device: torch.device | str | None = None, key: object | None = None,
                probe_side: int = PROBE_SIDE) -> Tensor:
    """Apply an image-to-image ``fn`` to ``image`` (B, C, H, W) in overlapping tiles of at most
    ``tile`` px: :func:`plan_tiles` then :func:`run_tiles`."""
    plan = plan_tiles(fn, image, tile, overlap, max_memory, multiple, tiles_per_batch, device, key, probe_side)
    return run_tiles(fn, image, plan, device)
