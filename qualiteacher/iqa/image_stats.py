"""Global image statistics that catch destroyed outputs: colourfulness, colour cast and clipping.

Pure torch functions (B, 3, H, W) in [0, 1] -> (B,), batched, differentiable almost everywhere
(square roots and ratios are kept away from zero by small constants, thresholds are sigmoids).
They are registered as ``physical:<name>`` members (``physical.PHYSICAL_METRICS``). Sources of
the ideas (our own code, written from the papers' formulas):

- ``colourfulness``: Hasler & Süsstrunk, "Measuring colourfulness in natural images", SPIE 5007,
  2003: ``M = sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2)`` on the opponent channels
  ``rg = R - G`` and ``yb = (R + G) / 2 - B`` (here on [0, 1] values, i.e. their M / 255).
  Higher = better; a grey-out or a constant image scores 0.
- ``colour_cast``: the cast factor of Gasparini & Schettini, "Color balancing of digital photos
  using simple image statistics", Pattern Recognition 37, 2004: in CIELab, the distance of the
  mean chroma from the neutral axis over the radius of the chroma distribution,
  ``K = D / (S + c)`` with ``D = |mean(a, b)|``, ``S = sqrt(var a + var b)``. A strong cast moves
  the whole distribution off grey (large D, unchanged S). Lower = better.
- ``clipping``: fraction of pixels with channels clipped at black or white (exposure clipping, a
  standard exposure-quality cue; e.g. the over/under-exposure terms of exposure-fusion quality,
  Mertens et al. 2007). Lower = better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab
from torch import Tensor


def colourfulness(images: Tensor) -> Tensor:
    """Hasler & Süsstrunk colourfulness on [0, 1] RGB (their M / 255)."""
    r, g, b = images.unbind(1)
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    spread = (rg.var(1) + yb.var(1) + 1e-8).sqrt()
    centre = (rg.mean(1) ** 2 + yb.mean(1) ** 2 + 1e-8).sqrt()
    return spread + 0.3 * centre


def colour_cast(images: Tensor, floor: float = 2.0, side: int = 48) -> Tensor:
    """Gasparini-Schettini cast factor ``|mean(a*, b*)| / (sqrt(var a* + var b*) + floor)``.

    A global statistic: computed on the image area-averaged by ``min(H, W) // side`` (the CIELab
    conversion's powers dominate the cost; 4x fewer pixels at 96 px, 25x at 256 px).
    """
    k = max(1, min(images.shape[-2:]) // side)
    x = F.avg_pool2d(images, k) if k > 1 else images
    lab = rgb_to_lab(x.clamp(0, 1))
    ab = lab[:, 1:].flatten(2)  # (B, 2, N)
    dist = (ab.mean(2).pow(2).sum(1) + 1e-6).sqrt()
    spread = (ab.var(2).sum(1) + 1e-6).sqrt()
    return dist / (spread + floor)


def clipping(images: Tensor, margin: float = 0.01, softness: float = 0.004, channels: int = 1,
             neutral: float = 0.0) -> Tensor:
    """Fraction of pixels with at least ``channels`` channels below ``margin`` or above ``1 - margin``.

    ``channels=1`` (the offline preset's choice) also counts saturated colours (a vivid orange has
    blue near 0), so desaturating a vivid photo lowers it; it is also what catches colour casts,
    colour halos and tile seams pushing one channel out of gamut (docs/iqa.md, "Why the weak kinds
    fail"). ``channels=2`` counts exposure clipping proper. ``neutral`` in [0, 1] weights each
    pixel by ``1 - neutral * chroma`` (chroma = max - min channel): at 1 a vivid colour's empty
    channel counts for little and a grey pixel at 0 or 1 counts fully.
    """
    if not 1 <= channels <= 3:
        raise ValueError(f"clipping: channels must be 1, 2 or 3, got {channels}")
    if not 0.0 <= neutral <= 1.0:
        raise ValueError(f"clipping: neutral must lie in [0, 1], got {neutral}")
    s = images.sort(1).values  # (B, 3, H, W), ascending per pixel
    low = torch.sigmoid((margin - s[:, channels - 1]) / softness)
    high = torch.sigmoid((s[:, 3 - channels] - (1 - margin)) / softness)
    hit = (low + high).clamp(max=1)
    if neutral:
        hit = hit * (1 - neutral * (s[:, 2] - s[:, 0]).clamp(0, 1))
    return hit.flatten(1).mean(1)
