"""Colour and tone destructions: how restorations lose, twist or invent colour.

Same contract as ``destruction.py`` (``fn(images, seed) -> images`` on (B, 3, H, W) in [0, 1],
size kept, deterministic for a seed, random draws from a CPU generator). Noise fields are drawn
once per call at (1, ., H, W) and shared by the batch, so an image gets the same result alone or
in a batch; ``hue_rotation`` draws one angle per image (its result depends on the position in the
batch). The last four imitate what our own students produced on the demo (docs/iqa.md, issue 25).

- ``desaturate``: half the chroma (every pixel halfway to its luma).
- ``hue_rotation``: chroma turned about the grey axis by +-90..180 degrees (one angle per image).
- ``sepia``: the classic sepia-toning matrix.
- ``chroma_noise``: Gaussian noise (sigma 0.08) on the chroma only, luma unchanged.
- ``overexpose``: gain 2, clipped.  ``crush_blacks``: the darkest quarter of the range cut to 0.
- ``chroma_speckle`` (student): 6 % of the pixels get a strong random colour offset.
- ``colour_halo`` (student, derain): cyan fringes on every edge and a pink tint on bright areas.
- ``brown_tint`` (student): colours collapse to a brown hue, 30 % of the chroma left.
- ``sepia_emboss`` (student, the stage-1 codebook of the demo): a brown relief of the luma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.iqa.image_ops import check_images, gaussian_blur, generator, luma, rotate_hue, scale_saturation

_SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
_BROWN = (1.12, 0.97, 0.78)  # a brown of luma ~1: luma * _BROWN keeps the brightness


def _field(images: Tensor, channels: int, seed: int) -> Tensor:
    """(1, channels, H, W) standard normal noise from the seed, on the images' device."""
    return torch.randn((1, channels, *images.shape[-2:]), generator=generator(seed)).to(images)


def _grey_free(rgb_noise: Tensor) -> Tensor:
    """The noise minus its luma: chroma only."""
    return rgb_noise - luma(rgb_noise)


def desaturate(images: Tensor, seed: int = 0, keep: float = 0.5) -> Tensor:
    check_images(images, "desaturate")
    return scale_saturation(images, keep)


def hue_rotation(images: Tensor, seed: int = 0) -> Tensor:
    check_images(images, "hue_rotation")
    g = generator(seed)
    b = images.shape[0]
    angle = 90 + 90 * torch.rand(b, generator=g)
    sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    return rotate_hue(images, (sign * angle).to(images))


def sepia(images: Tensor, seed: int = 0) -> Tensor:
    check_images(images, "sepia")
    return torch.einsum("ij,bjhw->bihw", _SEPIA.to(images), images).clamp(0, 1)


def chroma_noise(images: Tensor, seed: int = 0, sigma: float = 0.08) -> Tensor:
    check_images(images, "chroma_noise")
    return (images + sigma * _grey_free(_field(images, 3, seed))).clamp(0, 1)


def overexpose(images: Tensor, seed: int = 0, gain: float = 2.0) -> Tensor:
    check_images(images, "overexpose")
    return (images * gain).clamp(0, 1)


def crush_blacks(images: Tensor, seed: int = 0, cut: float = 0.25) -> Tensor:
    check_images(images, "crush_blacks")
    return ((images - cut) / (1 - cut)).clamp(0, 1)


def chroma_speckle(images: Tensor, seed: int = 0, fraction: float = 0.06, strength: float = 0.35) -> Tensor:
    check_images(images, "chroma_speckle")
    g = generator(seed)
    h, w = images.shape[-2:]
    mask = (torch.rand((1, 1, h, w), generator=g) < fraction).to(images)
    colour = _grey_free(torch.randn((1, 3, h, w), generator=g).to(images))
    colour = colour / colour.abs().amax(1, keepdim=True).clamp_min(1e-6)  # a saturated offset per pixel
    return (images + strength * mask * colour).clamp(0, 1)


def colour_halo(images: Tensor, seed: int = 0, fringe: float = 0.5, pink: float = 0.12) -> Tensor:
    check_images(images, "colour_halo")
    sigma = max(1.0, min(images.shape[-2:]) / 96)
    y = gaussian_blur(luma(images), sigma)
    gx = F.pad(y[..., :, 2:] - y[..., :, :-2], (1, 1, 0, 0), mode="replicate")
    gy = F.pad(y[..., 2:, :] - y[..., :-2, :], (0, 0, 1, 1), mode="replicate")
    edge = gaussian_blur((gx**2 + gy**2).sqrt(), sigma)  # a band around every edge
    edge = edge / edge.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]
    cyan = torch.tensor([-1.0, 0.5, 0.5], dtype=images.dtype, device=images.device)[None, :, None, None]
    magenta = torch.tensor([1.0, -0.6, 0.4], dtype=images.dtype, device=images.device)[None, :, None, None]
    bright = torch.sigmoid((luma(images) - 0.6) / 0.05)
    return (images + fringe * edge * cyan + pink * bright * magenta).clamp(0, 1)


def brown_tint(images: Tensor, seed: int = 0, keep: float = 0.3) -> Tensor:
    check_images(images, "brown_tint")
    y = luma(images)
    brown = torch.tensor(_BROWN, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (y * brown + keep * (images - y)).clamp(0, 1)


def sepia_emboss(images: Tensor, seed: int = 0, gain: float = 3.0) -> Tensor:
    check_images(images, "sepia_emboss")
    d = max(1, round(min(images.shape[-2:]) / 96))
    y = luma(images)
    relief = 0.5 + gain * (y - torch.roll(y, shifts=(d, d), dims=(2, 3)))
    brown = torch.tensor(_BROWN, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (0.85 * relief * brown).clamp(0, 1)


COLOUR_DESTRUCTIONS = {
    "desaturate": desaturate,
    "hue_rotation": hue_rotation,
    "sepia": sepia,
    "chroma_noise": chroma_noise,
    "overexpose": overexpose,
    "crush_blacks": crush_blacks,
    "chroma_speckle": chroma_speckle,
    "colour_halo": colour_halo,
    "brown_tint": brown_tint,
    "sepia_emboss": sepia_emboss,
}
