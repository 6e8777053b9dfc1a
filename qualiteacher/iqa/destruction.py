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
- ``emboss``: a grey relief of the luma.  ``oversharpen_wide``: unsharp mask, radius 4 px at 256
  px, 400 %.  ``halo``: wide halos (local contrast boost).  ``ringing``: Fourier brick-wall
  low-pass (Gibbs rings).  ``tile_seams``: 3 x 3 tiles with their own gains and offsets.
  ``codebook_mosaic``: blocks snapped to 16 k-means codewords of the image's own blocks.
  ``over_dehaze``: a clean photo dehazed as if hazy (a restorer that removes haze that is not
  there, or too much of it): crushed shadows, stretched contrast and colour.
- colour and tone (``destruction_colour.py``): partial desaturation, hue rotation, sepia, chroma
  noise, over-exposure, crushed blacks, and our students' chroma speckle, colour halos, brown
  tint and sepia emboss.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.classical.dark_channel import airlight_of
from qualiteacher.iqa.destruction_colour import COLOUR_DESTRUCTIONS
from qualiteacher.iqa.image_ops import check_images, gaussian_blur, generator, luma

Destruction = Callable[[Tensor, int], Tensor]


def _check(images: Tensor) -> None:
    check_images(images, "destruction transforms")


def greyout(images: Tensor, seed: int = 0) -> Tensor:
    """Full desaturation: every channel set to the Rec.601 luma."""
    _check(images)
    return luma(images).expand_as(images).contiguous()


def posterize(images: Tensor, seed: int = 0, levels: int = 4) -> Tensor:
    """``levels`` grey levels per channel (rounded to the nearest)."""
    _check(images)
    return torch.round(images.clamp(0, 1) * (levels - 1)) / (levels - 1)


def colour_cast(images: Tensor, seed: int = 0, strength: float = 0.45) -> Tensor:
    """Per-channel gains ``1 + strength * d`` with ``d`` a seed-chosen unit hue direction (zero sum)."""
    _check(images)
    angle = float(torch.rand((), generator=generator(seed))) * 2 * math.pi
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
    noise = torch.randn((b, 1, h, w), generator=generator(seed)).to(images)
    high = noise - gaussian_blur(noise, 1.0)  # keep the finest scales only
    high = high / high.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]
    return (0.7 * images + amplitude * high).clamp(0, 1)


def oversharpen(images: Tensor, seed: int = 0, amount: float = 4.0) -> Tensor:
    """Unsharp mask ``x + amount * (x - blur(x))`` with sigma ``max(1, min(H, W) / 96)``."""
    _check(images)
    sigma = max(1.0, min(images.shape[-2:]) / 96)
    return (images + amount * (images - gaussian_blur(images, sigma))).clamp(0, 1)


def heavy_blur(images: Tensor, seed: int = 0) -> Tensor:
    """Gaussian blur with sigma ``min(H, W) / 24`` (4 px at 96 px)."""
    _check(images)
    return gaussian_blur(images, max(1.0, min(images.shape[-2:]) / 24))


def constant(images: Tensor, seed: int = 0) -> Tensor:
    """Every pixel the image's mean colour."""
    _check(images)
    return images.mean((2, 3), keepdim=True).expand_as(images).contiguous()


def emboss(images: Tensor, seed: int = 0, gain: float = 3.0) -> Tensor:
    """A grey relief: mid-grey plus the luma's difference to its diagonal shift."""
    _check(images)
    d = max(1, round(min(images.shape[-2:]) / 96))
    y = luma(images)
    return (0.5 + gain * (y - torch.roll(y, shifts=(d, d), dims=(2, 3)))).clamp(0, 1).expand_as(images).contiguous()


def oversharpen_wide(images: Tensor, seed: int = 0, amount: float = 4.0) -> Tensor:
    """Unsharp mask of radius 4 px at 256 px (sigma ``min(H, W) / 64``), 400 %."""
    _check(images)
    sigma = max(1.0, min(images.shape[-2:]) / 64)
    return (images + amount * (images - gaussian_blur(images, sigma))).clamp(0, 1)


def halo(images: Tensor, seed: int = 0, amount: float = 1.0) -> Tensor:
    """Wide bright / dark halos around edges (local contrast boost, sigma ``min(H, W) / 12``)."""
    _check(images)
    sigma = max(1.0, min(images.shape[-2:]) / 12)
    return (images + amount * (images - gaussian_blur(images, sigma))).clamp(0, 1)


def ringing(images: Tensor, seed: int = 0, cutoff: float = 0.35) -> Tensor:
    """Brick-wall low-pass in the Fourier domain (``cutoff`` of Nyquist): Gibbs ringing at edges."""
    _check(images)
    h, w = images.shape[-2:]
    fy = torch.fft.fftfreq(h, device=images.device)[:, None]
    fx = torch.fft.rfftfreq(w, device=images.device)[None, :]
    keep = ((fy**2 + fx**2).sqrt() <= 0.5 * cutoff).to(images.dtype)
    return torch.fft.irfft2(torch.fft.rfft2(images) * keep, s=(h, w)).clamp(0, 1)


def tile_seams(images: Tensor, seed: int = 0, tiles: int = 3, gain: float = 0.15, offset: float = 0.05) -> Tensor:
    """A ``tiles`` x ``tiles`` grid, each tile with its own channel gains and offsets (tiled
    inference without overlap: the seams show)."""
    _check(images)
    h, w = images.shape[-2:]
    g = generator(seed)
    gains = 1 + gain * (2 * torch.rand((1, 3, tiles, tiles), generator=g) - 1)
    offsets = offset * (2 * torch.rand((1, 3, tiles, tiles), generator=g) - 1)
    rows = (torch.arange(h) * tiles // h)[:, None]
    cols = (torch.arange(w) * tiles // w)[None, :]
    gain_map = gains[:, :, rows, cols].to(images)  # (1, 3, H, W)
    return (images * gain_map + offsets[:, :, rows, cols].to(images)).clamp(0, 1)


def codebook_mosaic(images: Tensor, seed: int = 0, blocks: int = 12, codes: int = 16, iters: int = 8) -> Tensor:
    """Every block of side ``min(H, W) // blocks`` replaced by the nearest of ``codes`` block
    codewords (k-means on the image's own blocks): a VQ decoder with a tiny used codebook."""
    _check(images)
    b, c, h, w = images.shape
    k = max(2, min(h, w) // blocks)
    hp, wp = -(-h // k) * k, -(-w // k) * k
    x = F.pad(images, (0, wp - w, 0, hp - h), mode="replicate")
    patches = F.unfold(x, k, stride=k).transpose(1, 2)  # (B, N, C k k)
    n = patches.shape[1]
    start = torch.randperm(n, generator=generator(seed))[: min(codes, n)].to(images.device)
    book = patches[:, start]  # (B, K, D)
    for _ in range(iters):
        assign = torch.cdist(patches, book).argmin(2)  # (B, N)
        onehot = F.one_hot(assign, book.shape[1]).to(images.dtype)  # (B, N, K)
        count = onehot.sum(1)[..., None]
        book = torch.where(count > 0, onehot.transpose(1, 2) @ patches / count.clamp_min(1), book)
    decoded = book.gather(1, torch.cdist(patches, book).argmin(2)[..., None].expand(-1, -1, patches.shape[2]))
    out = F.fold(decoded.transpose(1, 2), (hp, wp), k, stride=k)
    return out[..., :h, :w].contiguous()


def over_dehaze(images: Tensor, seed: int = 0, transmission: float = 0.6) -> Tensor:
    """The scattering model inverted on a clean photo at ``transmission`` everywhere:
    ``A + (x - A) / t`` with ``A`` its airlight as the dark channel prior estimates it."""
    check_images(images, "over_dehaze")
    airlight = airlight_of(images)[:, :, None, None]
    return (airlight + (images - airlight) / transmission).clamp(0, 1)


DESTRUCTIONS: dict[str, Destruction] = {
    "greyout": greyout,
    "posterize": posterize,
    "colour_cast": colour_cast,
    "mosaic": mosaic,
    "noise_texture": noise_texture,
    "oversharpen": oversharpen,
    "heavy_blur": heavy_blur,
    "constant": constant,
    "emboss": emboss,
    "oversharpen_wide": oversharpen_wide,
    "halo": halo,
    "ringing": ringing,
    "tile_seams": tile_seams,
    "codebook_mosaic": codebook_mosaic,
    "over_dehaze": over_dehaze,
    **COLOUR_DESTRUCTIONS,
}


def list_destructions() -> list[str]:
    return list(DESTRUCTIONS)


def destroy(images: Tensor, kind: str, seed: int = 0) -> Tensor:
    """Apply the destruction ``kind`` to a batch (B, 3, H, W) in [0, 1]."""
    if kind not in DESTRUCTIONS:
        raise KeyError(f"unknown destruction {kind!r}; available: {list_destructions()}")
    return DESTRUCTIONS[kind](images, seed)
