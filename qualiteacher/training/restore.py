"""Inference: restore images of any size at a requested quality level, tiled with blending."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


AUTO_TILE_SIDE = 512  # images with more pixels than a square of this side are restored in such tiles
MIN_TILE = 16         # smaller tiles leave the model no context (a grid pattern in the output)


def auto_tile(image: Tensor, tile: int | None, side: int = AUTO_TILE_SIDE) -> int | None:
    """The tile size to restore ``image`` (..., H, W) with: ``tile`` if given (0 = never tile),
    else ``side`` when the image has more than ``side**2`` pixels (memory stays bounded whatever
    the size; a 20000 x 8 strip has few pixels and runs whole), else None."""
    if tile is not None:
        return tile or None
    h, w = image.shape[-2:]
    return side if h * w > side * side else None


def check_tile(tile: int | None, multiple: int = 8, overlap: int | None = None) -> None:
    """``ValueError`` unless ``tile`` (None / 0: no tiling) is at least the model's size
    ``multiple`` plus the ``overlap`` (default a quarter of the tile): smaller tiles leave the
    model no context and write a grid pattern."""
    if tile is None or tile == 0:
        return
    overlap = tile // 4 if overlap is None else overlap
    least = max(MIN_TILE, multiple + overlap, 2 * overlap + 1)
    if tile < least:
        raise ValueError(f"--tile {tile} is too small: tiles must be at least {least} px (the model's size "
                         f"multiple {multiple} plus the {overlap}-px overlap, and {MIN_TILE} px at least); use "
                         f"the training crop size or larger, or 0 for no tiling")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``: a ``ValueError``
    naming the problem when the device does not exist here (checked before any work starts)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps, auto): {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r} (cpu, cuda, mps)")
    return device


def _ramp(n: int, overlap: int, device: torch.device) -> Tensor:
    # 1-D blending weight: linear ramps over the overlap at both ends, 1 inside, never 0
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        w[:overlap] = r
        w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(n)})


@torch.no_grad()
def tiled_apply(fn: Callable[[Tensor], Tensor], image: Tensor, tile: int, overlap: int = 16,
                tiles_per_batch: int = 8, multiple: int = 1) -> Tensor:
    """Apply an image-to-image ``fn`` to ``image`` (B, C, H, W) in ``tile``-px tiles.

    Tiles overlap by ``overlap`` px and are blended with linear ramps; images smaller than a tile
    (or not a multiple of ``multiple``) are reflect/replicate padded and cropped back. At most
    ``tiles_per_batch`` tiles go through ``fn`` at once, so memory is bounded whatever the image
    size. Output tiles are accumulated on the image's device.
    """
    if tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must exceed twice the overlap ({overlap})")
    b, c, h, w = image.shape
    ph, pw = max(tile - h, (-h) % multiple), max(tile - w, (-w) % multiple)
    x = image
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(image, (0, pw, 0, ph), mode=mode)
    H, W = x.shape[-2:]
    stride = tile - overlap
    ys, xs = _starts(H, tile, stride), _starts(W, tile, stride)
    weight = _ramp(tile, overlap, x.device)
    weight2d = weight[:, None] * weight[None, :]                      # (tile, tile)
    out = torch.zeros((b, c, H, W), device=x.device, dtype=torch.float32)
    norm = torch.zeros((1, 1, H, W), device=x.device, dtype=torch.float32)
    coords = [(y, xx) for y in ys for xx in xs]
    for i in range(0, len(coords), tiles_per_batch):
        chunk = coords[i:i + tiles_per_batch]
        tiles = torch.cat([x[..., y:y + tile, xx:xx + tile] for y, xx in chunk])  # (n*B, C, t, t)
        res = fn(tiles).float()
        for j, (y, xx) in enumerate(chunk):
            out[..., y:y + tile, xx:xx + tile] += res[j * b:(j + 1) * b] * weight2d
            norm[..., y:y + tile, xx:xx + tile] += weight2d
    return (out / norm)[..., :h, :w].to(image.dtype)


@torch.no_grad()
def restore(model: nn.Module, images: Tensor, level: int | None = 7, tile: int | None = None,
            overlap: int | None = None, tiles_per_batch: int = 8, multiple: int = 8,
            w: float | None = None) -> Tensor:
    """Restore ``images`` (B, 3, H, W) in [0, 1] with a student at quality ``level`` (and, for a
    student with a fidelity path, fidelity ``w``; ``None``: the student's default).

    ``level=None`` runs unconditioned (as the teacher does). With ``tile`` set, the image is
    processed in overlapping tiles of that size (use the training crop size: codebook models with
    learned positions need it), so a 2048×2048 photo restores with bounded memory. ``overlap``
    defaults to a quarter of the tile.
    """
    was_training = model.training
    model.eval()
    try:
        def fn(x: Tensor) -> Tensor:
            lv = None if level is None else torch.full((x.shape[0],), level, device=x.device, dtype=torch.long)
            out = model(x, lv) if w is None else model(x, lv, w=w)  # any (x, level) model works
            return out.image.clamp(0, 1)

        if tile is None:
            h, wd = images.shape[-2:]  # not `w`: that is the fidelity weight fn passes on
            ph, pw = (-h) % multiple, (-wd) % multiple
            x = F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images
            return fn(x)[..., :h, :wd]
        overlap = tile // 4 if overlap is None else overlap
        return tiled_apply(fn, images, tile, overlap, tiles_per_batch, multiple)
    finally:
        model.train(was_training)
