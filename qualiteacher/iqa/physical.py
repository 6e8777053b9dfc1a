"""Task-aware physical IQA members: pure torch functions on (B, 3, H, W) in [0, 1] -> (B,).

All are batched and differentiable almost everywhere (min/max pools pass sub-gradients, the
thresholds are sigmoids, the histogram is a soft histogram). Raw scales and directions:

- ``haze_density``: mean dark channel (channel min, then a min-pool), lower = better.
- ``exposure``: mean of (1 - 2 |mean luminance - 0.5|) and (1 - under-exposed fraction), higher = better.
- ``contrast``: RMS contrast (std of luminance), higher = better.
- ``entropy``: entropy in bits of a soft 64-bin luminance histogram (linear binning), higher = better.
- ``rain_streaks``: gradient anisotropy along the best near-vertical orientation (log ratio of the
  mean absolute derivative across and along it), lower = better.
- ``snow_flakes``: fraction of pixels that are small bright blobs (white top-hat above a soft
  threshold), lower = better.
- ``blockiness``: JPEG 8-px grid strength (best grid phase against the others), lower = better.
- ``seams``: straight full-length seams (the most coherent column / row steps against the median
  one), lower = better.
- ``colourfulness``, ``colour_cast``, ``clipping``: global colour and exposure statistics that catch
  destroyed outputs (grey-out, wrong white balance, clipped or posterized values); see image_stats.py.
- ``chroma_spread``, ``chroma_tint``, ``chroma_noise``, ``hue_naturalness``: colour kept, colour
  collapsed into a tint, colour invented at the pixel level, colour turned to unnatural hues;
  see colour.py.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.iqa.colour import chroma_noise, chroma_spread, chroma_tint, hue_naturalness
from qualiteacher.iqa.image_stats import clipping, colour_cast, colourfulness

_LUMA = (0.299, 0.587, 0.114)


def luminance(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) Rec.601 luma."""
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
    return (images * w[None, :, None, None]).sum(1, keepdim=True)


def _odd_patch(h: int, w: int, target: int, divisor: int = 16) -> int:
    k = max(3, min(target, min(h, w) // divisor))
    return k if k % 2 else k + 1


def _min_pool(x: Tensor, k: int) -> Tensor:
    return -F.max_pool2d(F.pad(-x, (k // 2,) * 4, mode="replicate"), k, stride=1)


def _max_pool(x: Tensor, k: int) -> Tensor:
    return F.max_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)


def haze_density(images: Tensor, patch: int = 15) -> Tensor:
    """Mean dark channel prior (He et al.): haze lifts the darkest value of every patch."""
    k = _odd_patch(*images.shape[-2:], patch)
    dark = _min_pool(images.amin(1, keepdim=True), k)
    return dark.mean((1, 2, 3))


def exposure_quality(images: Tensor, dark_level: float = 0.1, softness: float = 0.02) -> Tensor:
    """Distance of mean luminance from mid-grey combined with the under-exposed pixel fraction."""
    y = luminance(images)
    mid = 1 - 2 * (y.mean((1, 2, 3)) - 0.5).abs()
    under = torch.sigmoid((dark_level - y) / softness).mean((1, 2, 3))
    return 0.5 * (mid + (1 - under))


def rms_contrast(images: Tensor) -> Tensor:
    """Standard deviation of luminance."""
    return luminance(images).flatten(1).std(1)


def soft_entropy(images: Tensor, bins: int = 64) -> Tensor:
    """Entropy (bits) of a soft luminance histogram (linear interpolation between bin centres)."""
    y = luminance(images).flatten(1).clamp(0, 1)  # (B, N)
    pos = (y * bins - 0.5).clamp(0, bins - 1)
    lo = pos.detach().floor().clamp(max=bins - 2)
    frac = pos - lo  # carries the gradient
    hist = torch.zeros(y.shape[0], bins, dtype=y.dtype, device=y.device)
    hist = hist.scatter_add(1, lo.long(), 1 - frac).scatter_add(1, lo.long() + 1, frac)
    hist = hist / y.shape[1]
    return -(hist * torch.log2(hist.clamp_min(1e-12))).sum(1)


def rain_streak_density(images: Tensor, max_angle: float = 40.0, steps: int = 9) -> Tensor:
    """Gradient anisotropy of near-vertical streaks: log(E|d_across| / E|d_along|), best angle.

    Streaks at angle ``a`` from vertical are smooth along ``a`` and sharp across it, so the mean
    absolute derivative across them grows relative to the one along them as rain gets denser;
    isotropic texture and noise give a ratio near 1 (log near 0). Angles in [-max_angle, max_angle].
    """
    y = luminance(images)
    yp = F.pad(y, (1, 1, 1, 1), mode="replicate")
    gx = (yp[..., 1:-1, 2:] - yp[..., 1:-1, :-2]) / 2  # (B, 1, H, W)
    gy = (yp[..., 2:, 1:-1] - yp[..., :-2, 1:-1]) / 2
    t = torch.deg2rad(torch.linspace(-max_angle, max_angle, steps, dtype=y.dtype, device=y.device))
    cos, sin = t.cos()[None, :, None, None], t.sin()[None, :, None, None]
    across = (gx * cos + gy * sin).abs().mean((2, 3))  # (B, A): derivative across a streak at angle t
    along = (gy * cos - gx * sin).abs().mean((2, 3))
    return torch.log((across + 1e-4) / (along + 1e-4)).amax(1)


def snow_flake_density(
    images: Tensor, blob_fraction: float = 0.06, threshold: float = 0.08, bright: float = 0.7, softness: float = 0.02,
    saturation: float = 0.2,
) -> Tensor:
    """Fraction of pixels in small bright white blobs.

    A pixel counts (softly, via sigmoids) when its white top-hat (luma minus the morphological
    opening with a square of side ``blob_fraction * min(H, W)``, at least 3 px) exceeds
    ``threshold``, its luma exceeds ``bright`` and its saturation (max - min channel) is below
    ``saturation`` (0.2 by default; the offline preset uses 0.4, so a brown tint cannot hide flakes).
    """
    y = luminance(images)
    k = max(3, round(blob_fraction * min(y.shape[-2:]))) | 1
    tophat = y - _max_pool(_min_pool(y, k), k)
    flake = (
        torch.sigmoid((tophat - threshold) / softness)
        * torch.sigmoid((y - bright) / softness)
        * torch.sigmoid((saturation - (images.amax(1, keepdim=True) - images.amin(1, keepdim=True))) / softness)
    )
    return flake.mean((1, 2, 3))


def _grid_ratio(diff: Tensor, period: int) -> Tensor:
    """(B, L) mean |difference| per position -> max over phases of phase mean / mean of the rest."""
    b, n = diff.shape
    n = n - n % period
    per_phase = diff[:, :n].reshape(b, -1, period).mean(1)  # (B, period)
    best = per_phase.amax(1)
    rest = (per_phase.sum(1) - best) / (period - 1)
    return best / rest.clamp_min(1e-6)


def blockiness(images: Tensor, period: int = 8) -> Tensor:
    """JPEG blocking: how much larger luma steps are on the strongest 8-px grid phase than off it.

    Mean absolute horizontal (vertical) differences are averaged per column (row) phase modulo
    ``period``; the best phase over the mean of the others, minus 1, averaged over both directions
    (0 for images without a block grid, whatever its offset).
    """
    y = luminance(images)[:, 0]
    dx = (y[:, :, 1:] - y[:, :, :-1]).abs().mean(1)  # (B, W-1)
    dy = (y[:, 1:, :] - y[:, :-1, :]).abs().mean(2)  # (B, H-1)
    return (_grid_ratio(dx, period) + _grid_ratio(dy, period)) / 2 - 1


def _boundary_coherence(steps: Tensor, dim: int) -> Tensor:
    """Per boundary: |mean signed step| over mean |step| along ``dim`` (1: the same step all
    along the line), the largest over the channels."""
    return (steps.mean(dim).abs() / (steps.abs().mean(dim) + 1e-3)).amax(1)


def seams(images: Tensor, top: int = 2) -> Tensor:
    """Straight seams (tiles restored with their own gains, codebook blocks): how much more
    coherent the ``top`` most coherent full-length column / row boundaries are than the median one.

    A boundary's coherence is |mean signed step| over mean |step| across it, per channel: a seam
    shifts the colour the same way along the whole line, a natural edge changes sign and
    strength along it. Averaged over both directions; lower = better.
    """
    cx = _boundary_coherence(images[..., :, 1:] - images[..., :, :-1], 2)  # (B, W-1)
    cy = _boundary_coherence(images[..., 1:, :] - images[..., :-1, :], 3)  # (B, H-1)
    score = []
    for c in (cx, cy):
        k = max(1, min(top, c.shape[1] // 4))
        score.append(c.topk(k, 1).values.mean(1) - c.median(1).values)
    return (score[0] + score[1]) / 2


PHYSICAL_METRICS: dict[str, Callable[..., Tensor]] = {
    "haze_density": haze_density,
    "exposure": exposure_quality,
    "contrast": rms_contrast,
    "entropy": soft_entropy,
    "rain_streaks": rain_streak_density,
    "snow_flakes": snow_flake_density,
    "blockiness": blockiness,
    "seams": seams,
    "colourfulness": colourfulness,
    "colour_cast": colour_cast,
    "clipping": clipping,
    "chroma_spread": chroma_spread,
    "chroma_tint": chroma_tint,
    "chroma_noise": chroma_noise,
    "hue_naturalness": hue_naturalness,
}


def list_physical_metrics() -> list[str]:
    return list(PHYSICAL_METRICS)


class PhysicalMember(nn.Module):
    """One physical metric as a module; ``options`` are the metric function's keyword arguments."""

    def __init__(self, metric: str, **options: float) -> None:
        super().__init__()
        if metric not in PHYSICAL_METRICS:
            raise ValueError(f"unknown physical metric {metric!r}; available: {list_physical_metrics()}")
        self.metric = metric
        self.options = dict(options)

    def forward(self, images: Tensor) -> Tensor:
        return PHYSICAL_METRICS[self.metric](images, **self.options)
