"""Low light by one global gamma curve per image: ``I ** g``, ``g`` chosen so that the mean of the
result (over pixels and channels) is a target (0.45: a mid-grey exposure)."""
from __future__ import annotations

import torch
from torch import Tensor

TARGET_MEAN = 0.45


def gamma_for_mean(images: Tensor, target: float = TARGET_MEAN, steps: int = 30,
                   bounds: tuple[float, float] = (1 / 16, 16.0)) -> Tensor:
    """``(B,)``: the gamma that gives each image of ``(B, C, H, W)`` the mean ``target``.

    ``mean(I ** g)`` falls as ``g`` grows, so a bisection on ``log g`` (``steps`` halvings of
    ``bounds``, all images at once) finds it; an image whose target lies outside what ``bounds``
    reach gets the nearer bound (an all-black image stays black).
    """
    log_i = images.clamp_min(0.0).log().flatten(1)  # (B, N); log 0 = -inf, and exp(-inf * g) = 0
    lo = torch.full(images.shape[:1], float(torch.tensor(bounds[0]).log()), device=images.device)
    hi = torch.full_like(lo, float(torch.tensor(bounds[1]).log()))
    for _ in range(steps):
        mid = (lo + hi) / 2
        too_bright = (log_i * mid.exp()[:, None]).exp().mean(dim=1) > target  # a larger gamma darkens
        lo, hi = torch.where(too_bright, mid, lo), torch.where(too_bright, hi, mid)
    return ((lo + hi) / 2).exp()


def gamma_to_mean(images: Tensor, target: float = TARGET_MEAN, gamma: Tensor | None = None) -> Tensor:
    """Brighten (or darken) ``(B, 3, H, W)`` images in [0, 1] by the gamma of `gamma_for_mean`
    (``gamma`` (B,): the gamma to use, e.g. a tile's image's; None computes it from ``images``)."""
    g = gamma_for_mean(images, target) if gamma is None else gamma.to(images.dtype)
    return images.clamp_min(0.0).pow(g[:, None, None, None]).clamp(0.0, 1.0)
