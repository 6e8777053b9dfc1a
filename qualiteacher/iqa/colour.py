"""Colour members: does an image keep natural colour? Reference-free, batched, differentiable.

Pure torch functions (B, 3, H, W) in [0, 1] -> (B,), registered as ``physical:<name>``
(``physical.PHYSICAL_METRICS``). They look at colour the luma-based members (BRISQUE, NIQE, PIQE
grade the grey image) cannot see: a greyscale, sepia or hue-rotated copy of a photo has the same
luma statistics as the photo.

- ``chroma_spread``: how much colour varies across the scene, beyond what follows the lightness:
  on the image area-averaged to a ~12-px short side (so pixel-level chroma noise and speckle
  average out and earn nothing), the CIELab chroma (a*, b*) is regressed on L* and the root mean
  square of the residual is returned. A greyscale copy scores 0, and so does a tinted one (sepia,
  brown: a* and b* follow L*); partial desaturation scales it down; a hue rotation keeps it.
  Higher = better up to the natural range: the preset normalises it with a cap (``range`` up to
  ``hi``, below most photos' spread), so colour beyond a natural photo's earns nothing.
- ``chroma_tint``: the mean chroma over that residual spread: a sepia or brown tint, a colour
  cast and a tinted relief put the chroma in one offset with nothing left beside it. Lower = better.
  Not in the ``offline`` preset: haze, rain and snow veils lower it (the neutral airlight shrinks
  the offset), so it pays for the task's own degradation.
- ``chroma_noise``: fine-scale chroma energy over fine-scale luma energy (both high-passed with a
  Gaussian of sigma 1 px). Natural photos carry their fine detail in the luma (optics, demosaicing
  and JPEG all smooth the chroma); chroma noise, speckle and coloured fringes raise the ratio.
  Lower = better.
- ``hue_naturalness``: how much of the colour sits at hues natural photos use: every pixel's hue
  gets the log-probability of its sector under a histogram of natural photos (``HUE_PRIOR``, 12
  sectors of 30 degrees, chroma-weighted, linear soft binning so it has a gradient); the member
  is the mean over pixels of ``w * clamp((log p - cap) / width, -1, 1)``, ``w`` the pixel's chroma
  weight (0 for grey, 1 from ``CHROMA_FULL_WEIGHT`` on): natural hues count +w, rare ones -w.
  A hue rotation moves skin, foliage, earth and sky to magenta, cyan or purple; a green or
  magenta cast and cyan fringes do the same. A grey image scores 0, so it gains nothing here
  either. Higher = better. Known weakness: the prior, from 9 photos, puts blue (sky) just below
  ``cap``, so a blue night sky counts slightly against. (A likelihood over hue x lightness was tried first: fitted on 9
  photos it did not hold on held-out ones, and a plain mean likelihood paid for collapsing every
  colour into the likeliest hue, a brown tint; docs/iqa.md.)

``fit_hue_prior`` builds the table from clean photos; ``HUE_PRIOR`` was fitted on the audit's
tune photos plus scikit-image's astronaut and coffee (``audit_photos``; never a report photo,
docs/iqa.md "Colour members").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab
from torch import Tensor

from qualiteacher.iqa.image_ops import gaussian_blur, luma, opponent

HUE_SECTORS = 12
CHROMA_FULL_WEIGHT = 10.0  # CIELab chroma at which a pixel counts fully in the hue statistics
NATURAL_LOG_PROB = -3.0  # hue sectors at least this likely (5 % of the chroma) count as natural
NATURAL_WIDTH = 0.5  # log-probability over which a sector goes from -1 (rare) to +1 (natural)
PRIOR_FLOOR = 0.002  # share of the histogram spread evenly: an unseen cell is rare, not impossible

# log-probabilities of 12 hue sectors (centres at 15 + 30 k degrees from +a*, towards +b*), from
# fit_hue_prior on the 7 tune photos of audit_photos.py (chelsea, flower, garden, houses, lighthouse,
# night_street, snow_traffic) plus astronaut and coffee, 4 crops each at 96 px
# (`audit_tune.fit_default_hue_prior` regenerates it)
HUE_PRIOR: tuple[float, ...] = (
    -2.570, -1.239, -1.375, -2.211, -2.577, -3.871, -3.586, -3.631, -3.336, -3.497, -3.519, -3.693,
)


def _lab(images: Tensor, side: int) -> Tensor:
    k = max(1, min(images.shape[-2:]) // side)
    x = F.avg_pool2d(images, k) if k > 1 else images
    return rgb_to_lab(x.clamp(0, 1))


def _chroma_moments(images: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """(|mean (a*, b*)|, RMS of (a*, b*) left after a linear fit on L*), both (B,), on the image
    area-averaged to a ``side``-px short side."""
    lab = _lab(images, side).flatten(2)  # (B, 3, N)
    mean = lab.mean(2, keepdim=True)
    centred = lab - mean
    lum, ab = centred[:, :1], centred[:, 1:]
    slope = (ab * lum).mean(2, keepdim=True) / (lum.pow(2).mean(2, keepdim=True) + 1e-3)
    residual = ab - slope * lum
    offset = (mean[:, 1:, 0].pow(2).sum(1) + 1e-6).sqrt()
    return offset, (residual.pow(2).sum(1).mean(1) + 1e-6).sqrt()


def chroma_spread(images: Tensor, side: int = 12) -> Tensor:
    """RMS of the CIELab chroma left after a linear fit on L*, on the image area-averaged to a
    ``side``-px short side (see the module doc)."""
    return _chroma_moments(images, side)[1]


def chroma_tint(images: Tensor, side: int = 12, floor: float = 2.0) -> Tensor:
    """Mean chroma over the chroma that does not follow L* (``|mean(a*, b*)| / (spread + floor)``,
    ``chroma_spread``'s residual): a cast factor in the manner of Gasparini & Schettini whose
    denominator a tint cannot fake, since a tinted grey has all its chroma in the tint."""
    offset, spread = _chroma_moments(images, side)
    return offset / (spread + floor)


def chroma_noise(images: Tensor, sigma: float = 1.0, floor: float = 0.002) -> Tensor:
    """RMS fine-scale opponent chroma over RMS fine-scale luma (``floor`` keeps flat images finite)."""
    def fine(x: Tensor) -> Tensor:
        return x - gaussian_blur(x, sigma)

    c = fine(opponent(images)).pow(2).sum(1).mean((1, 2)).add(1e-10).sqrt()
    y = fine(luma(images)).pow(2).mean((1, 2, 3)).add(1e-10).sqrt()
    return c / (y + floor)


def _soft_sectors(lab: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Linear soft binning of every pixel's hue: lower sector (float index), the part that goes
    to the next sector, and the pixel's chroma weight; each (B, N)."""
    a, b = lab[:, 1].flatten(1), lab[:, 2].flatten(1)
    chroma = (a.pow(2) + b.pow(2) + 1e-6).sqrt()
    weight = (chroma / CHROMA_FULL_WEIGHT).clamp(max=1.0)
    hue = torch.atan2(b, a) / (2 * math.pi) % 1.0 * HUE_SECTORS - 0.5  # sector centres at integers
    h0 = hue.detach().floor()
    return h0, hue - h0, weight


def fit_hue_prior(images: Tensor, side: int = 48) -> Tensor:
    """Log-probabilities (sectors,) of the chroma-weighted hue sectors of clean photos (B, 3, H, W)."""
    h0, fh, w = _soft_sectors(_lab(images, side))
    hist = torch.zeros(HUE_SECTORS, dtype=torch.float64)
    for dh, part in ((0, 1 - fh), (1, fh)):
        hist.scatter_add_(0, ((h0 + dh).long() % HUE_SECTORS).flatten(), (part * w).flatten().double())
    return (hist / hist.sum()).clamp_min(1e-6).log().float()


def hue_naturalness(images: Tensor, side: int = 48, cap: float = NATURAL_LOG_PROB, width: float = NATURAL_WIDTH,
                    prior: Tensor | None = None) -> Tensor:
    """Mean over pixels of ``w * clamp((log p(hue) - cap) / width, -1, 1)`` under ``prior``
    (default ``HUE_PRIOR``), on the image area-averaged to a ``side``-px short side (see the
    module doc): natural colour counts for, colour at rare hues against, grey neither."""
    table = (torch.tensor(HUE_PRIOR) if prior is None else prior).to(images.device, images.dtype)
    h0, fh, w = _soft_sectors(_lab(images, side))
    logp = (1 - fh) * table[h0.long() % HUE_SECTORS] + fh * table[(h0.long() + 1) % HUE_SECTORS]
    return (w * ((logp - cap) / width).clamp(-1.0, 1.0)).mean(1)
