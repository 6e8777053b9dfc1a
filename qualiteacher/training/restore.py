"""Inference: restore images of any size at a requested quality level, tiled with blending."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
            overlap: int | None = None, tiles_per_batch: int = 8, multiple: int = 8) -> Tensor:
    """Restore ``images`` (B, 3, H, W) in [0, 1] with a student at quality ``level``.

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
            return model(x, lv).image.clamp(0, 1)

        if tile is None:
            b, c, h, w = images.shape
            ph, pw = (-h) % multiple, (-w) % multiple
            x = F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images
            return fn(x)[..., :h, :w]
        overlap = tile // 4 if overlap is None else overlap
        return tiled_apply(fn, images, tile, overlap, tiles_per_batch, multiple)
    finally:
        model.train(was_training)
