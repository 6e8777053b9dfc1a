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
    """Maximum over a ``size`` x ``size`` window around every pixel (replicated borders); ``(B, C, H, W)``."""
    if size <= 1:
        return x
    p = size // 2
    return F.max_pool2d(F.pad(x, (p, p, p, p), mode="replicate"), size, stride=1)


def min_filter(x: Tensor, size: int) -> Tensor:
    """Minimum over a ``size`` x ``size`` window (a flat erosion); ``(B, C, H, W)``."""
    return -max_filter(-x, size)


def opening(x: Tensor, size: int) -> Tensor:
    """Flat opening (erosion, then dilation): removes bright structures narrower than the window."""
    return max_filter(min_filter(x, size), size)
