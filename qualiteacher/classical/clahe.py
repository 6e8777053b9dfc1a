"""Low light by contrast-limited adaptive histogram equalisation (CLAHE, Zuiderveld 1994) of the
value channel in HSV: brightness and local contrast change, hue and saturation are kept."""
from __future__ import annotations

import kornia
import torch
from torch import Tensor

TILE_PX = 48  # grid tiles of about this many pixels (8 x 8 tiles of a 384-px image)


def clahe(images: Tensor, clip_limit: float = 16.0, grid: tuple[int, int] | None = None) -> Tensor:
    """`kornia.enhance.equalize_clahe` on the V channel of ``(B, 3, H, W)`` in [0, 1].

    ``grid``: tiles per axis (default: tiles of about `TILE_PX`, 2 to 8 per axis); ``clip_limit``:
    the histogram clip, in multiples of a flat histogram's bin height (OpenCV's convention; the
    demo's val split: 2 -> 7.8 dB, 16 -> 14.0 dB, 40 -> 13.8 dB).
    """
    h, w = images.shape[-2:]
    grid = grid or (min(8, max(2, round(h / TILE_PX))), min(8, max(2, round(w / TILE_PX))))
    hsv = kornia.color.rgb_to_hsv(images.clamp(0.0, 1.0))
    value = kornia.enhance.equalize_clahe(hsv[:, 2:3].contiguous(), clip_limit=float(clip_limit),
                                           grid_size=grid)
    return kornia.color.hsv_to_rgb(torch.cat([hsv[:, :2], value], dim=1)).clamp(0.0, 1.0)
