"""Colour fidelity against a reference, one value per image: opponent-channel correlation and mean ΔE.

Structure metrics (PSNR on luma, SSIM) barely see a restorer that turns a blue sky brown; these do.

- ``colour_corr``: the opponent channels ``R - G`` (red-green) and ``(R + G) / 2 - B`` (yellow-blue),
  Pearson's correlation of each channel's pixels with the reference's, averaged over the two; 1 when
  the colours vary as the reference's do (up to a gain and an offset per channel), about 0 when they
  are unrelated, negative when swapped. A channel that is constant (standard deviation below
  ``CONSTANT_STD``, a tenth of an 8-bit step) has no correlation: it counts 1 when the reference's is
  constant too (a grey image for a grey reference), else 0 (colour lost, or invented).
- ``delta_e``: the mean over pixels of CIE76 ΔE, the Euclidean distance in CIELAB (`kornia.color.rgb_to_lab`,
  sRGB, D65): 0 for identical images, about 2.3 a just noticeable difference. CIE76 rather than CIEDE2000:
  a plain formula, and a mean over many pixels of a restoration, not a single patch's tolerance.
"""
from __future__ import annotations

import kornia
import torch
from torch import Tensor

CONSTANT_STD = 0.1 / 255


def _check(images: Tensor, targets: Tensor) -> None:
    if images.shape != targets.shape:
        raise ValueError(f"image and target shapes differ: {tuple(images.shape)} vs {tuple(targets.shape)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB batches (B, 3, H, W), got {tuple(images.shape)}")


def opponent_channels(images: Tensor) -> Tensor:
    """``(B, 2, H, W)``: red-green ``R - G`` and yellow-blue ``(R + G) / 2 - B`` of ``(B, 3, H, W)``."""
    r, g, b = images.float().unbind(dim=1)
    return torch.stack([r - g, (r + g) / 2 - b], dim=1)


def opponent_correlation(images: Tensor, targets: Tensor) -> Tensor:
    """``(B,)``: the opponent-channel colour correlation of each image with its target (module docstring)."""
    _check(images, targets)
    x, y = opponent_channels(images).flatten(2), opponent_channels(targets).flatten(2)  # (B, 2, N)
    x, y = x - x.mean(dim=2, keepdim=True), y - y.mean(dim=2, keepdim=True)
    sx, sy = x.pow(2).mean(dim=2).sqrt(), y.pow(2).mean(dim=2).sqrt()                  # (B, 2)
    r = (x * y).mean(dim=2) / (sx * sy).clamp_min(1e-12)
    flat_x, flat_y = sx < CONSTANT_STD, sy < CONSTANT_STD
    r = torch.where(flat_x | flat_y, (flat_x & flat_y).to(r.dtype), r.clamp(-1.0, 1.0))
    return r.mean(dim=1)


def delta_e(images: Tensor, targets: Tensor) -> Tensor:
    """``(B,)``: mean CIE76 ΔE of each image against its target, both ``(B, 3, H, W)`` sRGB in [0, 1]."""
    _check(images, targets)
    lab_x = kornia.color.rgb_to_lab(images.float().clamp(0.0, 1.0))
    lab_y = kornia.color.rgb_to_lab(targets.float().clamp(0.0, 1.0))
    return (lab_x - lab_y).pow(2).sum(dim=1).sqrt().mean(dim=(1, 2))
