"""Full-reference metrics (PSNR, SSIM) on batches, one value per image.

:func:`fullref_scores` is what the evaluations call: PSNR and SSIM of every image, NaN with a
reason where a metric cannot judge the image (SSIM's Gaussian window is 11 px: an image under
11 px on a side, e.g. a 20000 x 8 strip, has no SSIM), so one odd image never stops a run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import kornia
import torch
from torch import Tensor

# ITU-R BT.601 studio-swing luma (MATLAB ``rgb2ycbcr``), the convention of restoration papers that
# report "PSNR on Y": Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 1].
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def to_y(images: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` in [16/255, 235/255] of RGB ``images`` ``(B, 3, H, W)`` in [0, 1]."""
    w = images.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
    return (16.0 + (images * w).sum(dim=1, keepdim=True)) / 255.0


def _prepare(images: Tensor, targets: Tensor, border: int, y_channel: bool) -> tuple[Tensor, Tensor]:
    if images.shape != targets.shape:
        raise ValueError(f"image and target shapes differ: {tuple(images.shape)} vs {tuple(targets.shape)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB batches (B, 3, H, W), got {tuple(images.shape)}")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    h, w = images.shape[-2:]
    if 2 * border >= min(h, w):
        raise ValueError(f"border {border} leaves nothing of a {h}x{w} image")
    images, targets = images.float(), targets.float()
    if border:
        images = images[..., border:h - border, border:w - border]
        targets = targets[..., border:h - border, border:w - border]
    if y_channel:
        images, targets = to_y(images), to_y(targets)
    return images, targets


def psnr(images: Tensor, targets: Tensor, border: int = 0, y_channel: bool = False) -> Tensor:
    """PSNR in dB of each image against its target, ``(B,)``; both ``(B, 3, H, W)`` in [0, 1].

    ``border`` pixels are cropped from every side first; ``y_channel`` compares BT.601 luma
    (`to_y`) instead of RGB. Identical images give ``inf``.
    """
    x, y = _prepare(images, targets, border, y_channel)
    per_image = torch.vmap(lambda a, b: kornia.metrics.psnr(a, b, 1.0))
    return per_image(x, y)


def ssim(images: Tensor, targets: Tensor, border: int = 0, y_channel: bool = False,
         window_size: int = 11) -> Tensor:
    """SSIM of each image against its target, ``(B,)``; both ``(B, 3, H, W)`` in [0, 1].

    Gaussian window (``window_size``, sigma 1.5), constants of Wang et al. (2004) for data range 1,
    mean over the valid (unpadded) map and over channels. ``border`` and ``y_channel`` as in `psnr`.
    """
    x, y = _prepare(images, targets, border, y_channel)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size} px, got {tuple(x.shape[-2:])}")
    ssim_map = kornia.metrics.ssim(x, y, window_size, max_val=1.0, padding="valid")  # (B, C, h, w)
    return ssim_map.mean(dim=(1, 2, 3))


class FullRefScores(NamedTuple):
    psnr: Tensor   # (B,) dB, NaN where unscorable
    ssim: Tensor   # (B,) NaN where unscorable
    note: str      # why a value is NaN ("" when both were computed)


def ssim_unscorable(height: int, width: int, border: int = 0, window_size: int = 11) -> str | None:
    """Why SSIM cannot score an ``height`` x ``width`` image (after ``border``), or None."""
    h, w = height - 2 * border, width - 2 * border
    if min(h, w) < window_size:
        return f"SSIM not computed: {w}x{h} px is under SSIM's {window_size}-px window"
    return None


def fullref_scores(images: Tensor, targets: Tensor, border: int = 0, y_channel: bool = False) -> FullRefScores:
    """PSNR and SSIM of same-sized ``images`` against ``targets`` ``(B, 3, H, W)``, never raising
    for a small or extreme image: what cannot be scored is NaN and ``note`` says why."""
    b = images.shape[0]
    nan = torch.full((b,), math.nan)
    h, w = images.shape[-2:]
    if 2 * border >= min(h, w):
        return FullRefScores(nan, nan.clone(), f"PSNR and SSIM not computed: border {border} leaves nothing of {w}x{h} px")
    value_psnr = psnr(images, targets, border, y_channel).float().cpu()
    reason = ssim_unscorable(h, w, border)
    value_ssim = nan if reason else ssim(images, targets, border, y_channel).float().cpu()
    return FullRefScores(value_psnr, value_ssim, reason or "")
