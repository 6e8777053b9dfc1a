"""Low light by an illumination map, in the spirit of LIME (Guo, Li and Ling, TIP 2017): the
initial illumination of a pixel is its brightest channel, ``T0 = max_c I``; a structure-aware
smoothing refines it (here a self-guided filter, `kornia.filters.guided_blur`, which flattens
texture inside regions and keeps their edges); the image is divided by the map raised to a gamma
below one, ``J = I / T ** gamma``. Dividing every channel by the same map keeps the hue."""
from __future__ import annotations

import kornia
from torch import Tensor

RADIUS = 30  # guided-filter radius in pixels (the demo's val split: 2 px 15.66 dB, 30 px 16.11 dB)


def illumination_map(images: Tensor, radius: int | None = None, eps: float = 1e-3) -> Tensor:
    """The refined illumination ``(B, 1, H, W)`` of ``(B, 3, H, W)`` in [0, 1]."""
    radius = min(RADIUS if radius is None else radius, (min(images.shape[-2:]) - 1) // 2)  # fits the image
    t0 = images.amax(dim=1, keepdim=True)                               # (B, 1, H, W)
    return kornia.filters.guided_blur(t0, t0, 2 * radius + 1, eps, separable=True).clamp(0.0, 1.0)


def lime(images: Tensor, gamma: float = 0.8, floor: float = 0.02, radius: int | None = None,
         eps: float = 1e-3) -> Tensor:
    """Brighten ``(B, 3, H, W)`` in [0, 1] by ``I / max(T, floor) ** gamma``; clipped to [0, 1]."""
    t = illumination_map(images, radius, eps).clamp_min(floor)
    return (images / t.pow(gamma)).clamp(0.0, 1.0)
