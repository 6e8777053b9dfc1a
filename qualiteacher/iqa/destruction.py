"""Destruction transforms: how restoration networks fail, applied to clean images.

A grading ensemble that scores one of these above its clean source teaches that failure to a
student trained on its reward (stage 3). Every transform is a pure torch function
``fn(images, seed) -> images`` on a batch (B, 3, H, W) in [0, 1]: batched, same size out,
deterministic for a seed (random draws come from a CPU ``torch.Generator`` seeded with ``seed``,
so the result does not depend on the device or on the global RNG). Spatial sizes are fractions of
``min(H, W)`` so a transform looks alike at every image size.

- ``greyout``: full desaturation to Rec.601 luma (the demo's grey outputs).
- ``posterize``: 4 levels per channel (banding, lost gradations).
- ``colour_cast``: strong per-channel gain towards a seed-chosen hue, as a wrong white balance.
- ``mosaic``: blocks of side ``min(H, W) / 12`` replaced by their mean, colours snapped to 8
  levels per channel (what a VQ decoder with too few codes produces).
- ``noise_texture``: dark, high-contrast high-frequency texture laid over the content (a student
  that paints texture the dark-channel and contrast members pay for).
- ``oversharpen``: unsharp mask, amount 4 (halos and ringing around edges, clipping).
- ``heavy_blur``: Gaussian blur, sigma ``min(H, W) / 24``.
- ``constant``: every pixel the image's mean colour (a collapsed decoder).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.299, 0.587, 0.114)

Destruction = Callable[[Tensor, int], Tensor]


def _check(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"destruction transforms expect images (B, 3, H, W), got {tuple(images.shape)}")


def _luma(images: Tensor) -> Tensor:
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
    return (images * w[None, :, None, None]).sum(1, keepdim=True)


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding (radius 3 sigma, at most the image side - 1)."""
    h, w = images.shape[-2:]
    r = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    ax = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, -1)
    c = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def greyout(images: Tensor, seed: int = 0) -> Tensor:
    """Full desaturation: every channel set to the Rec.601 luma."""
    _check(images)
    return _luma(images).expand_as(images).contiguous()


def posterize(images: Tensor, seed: int = 0, levels: int = 4) -> Tensor:
    """``levels`` grey levels per channel (rounded to the nearest)."""
    _check(images)
    return torch.round(images.clamp(0, 1) * (levels - 1)) / (levels - 1)


def colour_cast(images: Tensor, seed: int = 0, strength: float = 0.45) -> Tensor:
    """Per-channel gains ``1 + strength * d`` with ``d`` a seed-chosen unit hue direction (zero sum)."""
    _check(images)
    angle = float(torch.rand((), generator=_generator(seed))) * 2 * math.pi
    # unit vectors orthogonal to grey (1, 1, 1): a hue direction in the chroma plane
    u = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
    v = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6)
    d = (math.cos(angle) * u + math.sin(angle) * v) * math.sqrt(3 / 2)
    gain = (1 + strength * d).to(images)
    return (images * gain[None, :, None, None]).clamp(0, 1)


def mosaic(images: Tensor, seed: int = 0, blocks: int = 12, levels: int = 8) -> Tensor:
    """Blocks of side ``min(H, W) // blocks`` (>= 2 px) set to their mean, snapped to ``levels``."""
    _check(images)
    h, w = images.shape[-2:]
    k = max(2, min(h, w) // blocks)
    means = F.avg_pool2d(images, k, stride=k, ceil_mode=True)
    up = means.repeat_interleave(k, 2).repeat_interleave(k, 3)[..., :h, :w]
    return torch.round(up.clamp(0, 1) * (levels - 1)) / (levels - 1)


def noise_texture(images: Tensor, seed: int = 0, amplitude: float = 0.25) -> Tensor:
    """Darkened content plus a high-pass filtered, high-contrast noise texture (grey, per pixel)."""
    _check(images)
    b, _, h, w = images.shape
    noise = torch.randn((b, 1, h, w), generator=_generator(seed)).to(images)
    high = noise - _gaussian_blur(noise, 1.0)  # keep the finest scales only
    high = high / high.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]
    return (0.7 * images + amplitude * high).clamp(0, 1)


def oversharpen(images: Tensor, seed: int = 0, amount: float = 4.0) -> Tensor:
    """Unsharp mask ``x + amount * (x - blur(x))`` with sigma ``max(1, min(H, W) / 96)``."""
    _check(images)
    sigma = max(1.0, min(images.shape[-2:]) / 96)
    return (images + amount * (images - _gaussian_blur(images, sigma))).clamp(0, 1)


def heavy_blur(images: Tensor, seed: int = 0) -> Tensor:
    """Gaussian blur with sigma ``min(H, W) / 24`` (4 px at 96 px)."""
    _check(images)
    return _gaussian_blur(images, max(1.0, min(images.shape[-2:]) / 24))


def constant(images: Tensor, seed: int = 0) -> Tensor:
    """Every pixel the image's mean colour."""
    _check(images)
    return images.mean((2, 3), keepdim=True).expand_as(images).contiguous()


DESTRUCTIONS: dict[str, Destruction] = {
    "greyout": greyout,
    "posterize": posterize,
    "colour_cast": colour_cast,
    "mosaic": mosaic,
    "noise_texture": noise_texture,
    "oversharpen": oversharpen,
    "heavy_blur": heavy_blur,
    "constant": constant,
}


def list_destructions() -> list[str]:
    return list(DESTRUCTIONS)


def destroy(images: Tensor, kind: str, seed: int = 0) -> Tensor:
    """Apply the destruction ``kind`` to a batch (B, 3, H, W) in [0, 1]."""
    if kind not in DESTRUCTIONS:
        raise KeyError(f"unknown destruction {kind!r}; available: {list_destructions()}")
    return DESTRUCTIONS[kind](images, seed)
