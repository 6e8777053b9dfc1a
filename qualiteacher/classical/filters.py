"""Window filters the classical restorers share: flat min / max filters, opening, window sizes.

Flat square windows through ``max_pool2d`` keep memory at the image's size on any device (an
unfolded median or morphology kernel holds ``k * k`` copies of the image).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def fit_window(size: int, side: int, share: int = 6) -> int:
    """``size``, shrunk on small images to the largest odd window of at most ``side / share``
    pixels (at least 3): a window the size of the image would see one patch only."""
    return max(3, min(size, (side // share - 1) | 1))


def max_filter(x: Tensor, size: int) -> Tensor:
    """Maximum over a ``size`` x ``size`` window around every pixel (replicated borders); ``(B, C, H, W)``.
    Separable (a row window, then a column window): the same maximum in ``2k`` comparisons a pixel
    instead of ``k * k`` (15 px: 7x fewer; a 1-MP dehaze restore spent 6 % of its time here)."""
    if size <= 1:
        return x
    p = size // 2
    rows = F.max_pool2d(F.pad(x, (p, p, 0, 0), mode="replicate"), (1, size), stride=1)
    return F.max_pool2d(F.pad(rows, (0, 0, p, p), mode="replicate"), (size, 1), stride=1)


def min_filter(x: Tensor, size: int) -> Tensor:
    """Minimum over a ``size`` x ``size`` window (a flat erosion); ``(B, C, H, W)``."""
    return -max_filter(-x, size)


def opening(x: Tensor, size: int) -> Tensor:
    """Flat opening (erosion, then dilation): removes bright structures narrower than the window."""
    return max_filter(min_filter(x, size), size)
