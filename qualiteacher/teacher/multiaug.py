"""Multi-augmentation: degraded variants of pseudo-labels that widen the quality spectrum.

Every function works on a whole batch on its device (kornia), one random strength per sample, so
the candidates of a batch are produced without a Python loop over images.
"""
from __future__ import annotations

from typing import NamedTuple

import kornia
import torch
from torch import Tensor

AUGMENTATIONS: tuple[str, ...] = ("blur", "noise", "jpeg", "residual", "contrast")


class Variants(NamedTuple):
    images: Tensor      # (B * n, 3, H, W) degraded pseudo-labels
    source: Tensor      # (B * n,) long: index of the pseudo-label each variant came from
    kind: list[str]     # augmentation name of every variant
    strength: Tensor    # (B * n,) strength in [0, 1]


def _blur(pl: Tensor, s: Tensor) -> Tensor:
    sigma = (0.3 + 2.7 * s).unsqueeze(1).expand(-1, 2)  # (B, 2)
    return kornia.filters.gaussian_blur2d(pl, (9, 9), sigma, border_type="reflect")


def _noise(pl: Tensor, s: Tensor, gen: torch.Generator | None) -> Tensor:
    std = (0.01 + 0.11 * s).view(-1, 1, 1, 1)
    noise = torch.randn(pl.shape, generator=gen, device=pl.device, dtype=pl.dtype)
    return pl + std * noise


def _jpeg(pl: Tensor, s: Tensor) -> Tensor:
    quality = (90.0 - 80.0 * s).to(pl.dtype)  # strength 1 -> JPEG quality 10
    h, w = pl.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16  # the codec works on 16-px macro blocks
    x = torch.nn.functional.pad(pl, (0, pw, 0, ph), mode="replicate") if ph or pw else pl
    out = kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), quality)
    return out[..., :h, :w]


def _residual(pl: Tensor, lq: Tensor, s: Tensor) -> Tensor:
    # the task's own degradation, partly put back: a blend towards the degraded input
    a = (0.15 + 0.6 * s).view(-1, 1, 1, 1)
    return (1 - a) * pl + a * lq


def _contrast(pl: Tensor, s: Tensor) -> Tensor:
    factor = (1.0 - 0.7 * s).view(-1, 1, 1, 1)
    mean = pl.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (pl - mean)


@torch.no_grad()
def multi_augment(
    pl: Tensor,
    lq: Tensor,
    n_variants: int = 2,
    kinds: tuple[str, ...] = AUGMENTATIONS,
    max_strength: float = 1.0,
    generator: torch.Generator | None = None,
) -> Variants:
    """Make ``n_variants`` degraded copies of every pseudo-label ``pl`` (B, 3, H, W).

    Each copy gets one augmentation kind drawn from ``kinds`` and a strength uniform in
    ``[0, max_strength]``. ``lq`` is the degraded input the pseudo-label was restored from (used by
    the ``residual`` kind). Returns the variants grouped by kind (one batched call per kind).
    """
    unknown = set(kinds) - set(AUGMENTATIONS)
    if unknown or not kinds:
        raise ValueError(f"unknown augmentation kinds {sorted(unknown)}; known: {AUGMENTATIONS}")
    b = pl.shape[0]
    dev = pl.device
    source = torch.arange(b, device=dev).repeat(n_variants)  # (B * n,)
    draw = torch.randint(len(kinds), (b * n_variants,), generator=generator, device="cpu")
    strength = torch.rand(b * n_variants, generator=generator, device="cpu") * max_strength
    strength = strength.to(dev, pl.dtype)
    out = torch.empty((b * n_variants, *pl.shape[1:]), device=dev, dtype=pl.dtype)
    names = [kinds[int(i)] for i in draw]
    draw = draw.to(dev)
    for k, kind in enumerate(kinds):
        sel = (draw == k).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        src, s = pl[source[sel]], strength[sel]
        if kind == "blur":
            res = _blur(src, s)
        elif kind == "noise":
            res = _noise(src, s, None)
        elif kind == "jpeg":
            res = _jpeg(src, s)
        elif kind == "residual":
            res = _residual(src, lq[source[sel]], s)
        else:
            res = _contrast(src, s)
        out[sel] = res.clamp(0, 1)
    return Variants(out, source, names, strength)
