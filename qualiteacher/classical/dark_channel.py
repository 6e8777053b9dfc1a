"""Dehazing by the dark channel prior (He, Sun and Tang, CVPR 2009), guided-filter refined (He et
al., ECCV 2010), from the paper's formulas.

Haze model: ``I = J t + A (1 - t)``. In a haze-free outdoor patch some channel is nearly black, so
the dark channel of ``I / A`` estimates ``1 - t``; the airlight ``A`` is the colour of the haziest
pixels: among the brightest 0.1 % of the dark channel, the one of highest intensity in ``I``.
"""
from __future__ import annotations

import math

import kornia
from torch import Tensor

from qualiteacher.classical.filters import fit_window, min_filter

PATCH = 15  # the paper's 15 x 15 patch (measured on the demo's 96-px images: 3 px loses 2.9 dB)


def dark_channel(images: Tensor, patch: int) -> Tensor:
    """``min`` over the channels and a ``patch`` x ``patch`` window: ``(B, 3, H, W) -> (B, 1, H, W)``."""
    return min_filter(images.amin(dim=1, keepdim=True), patch)


def estimate_airlight(images: Tensor, dark: Tensor, top: float = 0.001) -> Tensor:
    """``(B, 3)``: per image, of the ``top`` share of pixels with the brightest dark channel, the
    colour of the one with the highest intensity (sum of R, G, B) in ``images``."""
    b, _, h, w = images.shape
    k = max(1, math.ceil(top * h * w))
    idx = dark.flatten(1).topk(k, dim=1).indices                       # (B, k)
    candidates = images.flatten(2).gather(2, idx[:, None].expand(b, 3, k))  # (B, 3, k)
    best = candidates.sum(dim=1).argmax(dim=1)                         # (B,)
    return candidates.gather(2, best[:, None, None].expand(b, 3, 1))[..., 0]


def transmission(images: Tensor, airlight: Tensor, patch: int, omega: float = 0.95) -> Tensor:
    """Coarse transmission ``t = 1 - omega * dark(I / A)``, ``(B, 1, H, W)``; ``omega < 1`` keeps a
    trace of haze for depth perception (the paper's 0.95)."""
    normalised = images / airlight.clamp_min(1e-3)[:, :, None, None]
    return 1.0 - omega * dark_channel(normalised, patch)


def airlight_of(images: Tensor, patch: int | None = None) -> Tensor:
    """``(B, 3)``: the airlight `dark_channel_prior` estimates for ``images`` (B, 3, H, W). A
    statistic of the whole image: a tile of it is restored with the airlight of its image (taken
    from a downscaled copy, see `qualiteacher.training.restore`), not with one of its own."""
    patch = patch or fit_window(PATCH, min(images.shape[-2:]))
    return estimate_airlight(images, dark_channel(images, patch))


def dark_channel_prior(images: Tensor, patch: int | None = None, omega: float = 0.95, t_min: float = 0.1,
                       radius: int | None = None, eps: float = 1e-3, airlight: Tensor | None = None) -> Tensor:
    """Dehaze RGB ``images`` ``(B, 3, H, W)`` in [0, 1]; the result in [0, 1].

    ``patch``: the dark channel's window (default 15; smaller on images under 96 px, `fit_window`).
    The coarse transmission is refined by a guided filter (`kornia.filters.guided_blur`) guided by
    the grey image, window ``2 * radius + 1`` (default radius: 4 patches) and ``eps``,
    clamped at ``t_min``; then ``J = (I - A) / t + A``. ``airlight`` (B, 3): the airlight to use
    (e.g. its image's, for a tile: `airlight_of`); None estimates it from ``images``.
    """
    patch = patch or fit_window(PATCH, min(images.shape[-2:]))
    radius = radius if radius is not None else 4 * patch
    if airlight is None:
        airlight = estimate_airlight(images, dark_channel(images, patch))
    airlight = airlight.to(images.dtype)[:, :, None, None]              # (B, 3, 1, 1)
    coarse = transmission(images, airlight[:, :, 0, 0], patch, omega)
    radius = min(radius, (min(images.shape[-2:]) - 1) // 2)  # the window fits the image
    grey = kornia.color.rgb_to_grayscale(images)
    t = kornia.filters.guided_blur(grey, coarse, 2 * radius + 1, eps, separable=True).clamp(t_min, 1.0)
    return ((images - airlight) / t + airlight).clamp(0.0, 1.0)
