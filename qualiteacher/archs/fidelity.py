"""IQPIR's fidelity path (METHOD.md §5): SFT-style fusion of LQ encoder features into the decoder.

At a few decoder scales ``dec ← dec + w · (dec ⊙ scale + shift)``, where ``scale`` and ``shift``
are small conv nets applied to a residual block of ``concat(enc, dec)``. ``w = 0`` is the pure
codebook prior, ``w = 1`` the most faithful output. The encoder features arrive detached (the
fusion never trains the encoder). Optional AdaIN re-normalises the quantised latent to the channel
statistics of the LQ feature (keeps colour and illumination).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from qualiteacher.archs.conditioning import LevelEmbedding
from qualiteacher.archs.vqae import ResBlock


def _conv_pair(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(ch, ch, 3, padding=1))


def fidelity_weight(w: float | Tensor, batch: int, like: Tensor) -> Tensor | float:
    """``w`` as a python float or a (B, 1, 1, 1) tensor broadcastable against ``like`` (B, C, H, W)."""
    if isinstance(w, Tensor):
        if w.ndim == 0:
            return w.to(like.dtype)
        if w.shape != (batch,):
            raise ValueError(f"fidelity w must be a float or a ({batch},) tensor, got shape {tuple(w.shape)}")
        return w.to(like.dtype).view(-1, 1, 1, 1)
    return float(w)


def is_zero(w: float | Tensor) -> bool:
    """True when ``w`` is exactly zero everywhere (the pure-prior path can skip the fusion)."""
    return bool((w == 0).all()) if isinstance(w, Tensor) else float(w) == 0.0


class FidelityFusion(nn.Module):
    """One fusion block at one decoder scale.

    ``forward(enc, dec, w, level)``: enc (B, Ce, H, W) LQ encoder feature (detached by the caller),
    dec (B, Cd, H, W) decoder feature. With ``n_levels`` set, a zero-initialised level embedding is
    added to the block's hidden feature (the plug-in quality conditioning of §5 applied to the
    fidelity path), so ``level=None`` and an untrained embedding leave the block unconditioned.
    """

    def __init__(self, enc_channels: int, dec_channels: int, n_levels: int | None = None) -> None:
        super().__init__()
        self.block = ResBlock(enc_channels + dec_channels, dec_channels)
        self.scale = _conv_pair(dec_channels)
        self.shift = _conv_pair(dec_channels)
        self.level_embedding = LevelEmbedding(n_levels, dec_channels) if n_levels else None

    def forward(self, enc: Tensor, dec: Tensor, w: float | Tensor, level: Tensor | None = None) -> Tensor:
        h = self.block(torch.cat([enc, dec], dim=1))
        if self.level_embedding is not None:
            h = self.level_embedding(h, level)
        return dec + fidelity_weight(w, dec.shape[0], dec) * (dec * self.scale(h) + self.shift(h))


class FidelityPath(nn.Module):
    """The fusion blocks of every configured scale (keys: downscale factors relative to the input).

    ``scales`` are downscale factors (1 = full resolution, 2 = half …); the released IQPIR fuses at
    32, 64, 128 and 256 px of a 512-px input, i.e. factors 16, 8, 4, 2. ``channels[f]`` gives the
    (equal) encoder and decoder width at factor ``f``.
    """

    def __init__(self, scales: tuple[int, ...], channels: Mapping[int, int], n_levels: int | None = None,
                 adain: bool = False) -> None:
        super().__init__()
        unknown = [s for s in scales if s not in channels]
        if unknown:
            raise ValueError(f"fidelity scales {unknown} are not decoder scales; available: {sorted(channels)}")
        self.scales = tuple(sorted(set(scales)))
        self.blocks = nn.ModuleDict({str(s): FidelityFusion(channels[s], channels[s], n_levels) for s in self.scales})
        self.adain = adain

    def fuse(self, factor: int, dec: Tensor, skips: Mapping[int, Tensor], w: float | Tensor,
             level: Tensor | None) -> Tensor:
        """Apply the block of ``factor`` (if any) to the decoder feature ``dec``."""
        key = str(factor)
        if key not in self.blocks:
            return dec
        return self.blocks[key](skips[factor], dec, w, level)


def adain(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """Re-normalise ``content`` (B, C, H, W) to the per-channel mean and std of ``style``."""
    c_mean, c_std = content.mean((-2, -1), keepdim=True), content.std((-2, -1), keepdim=True) + eps
    s_mean, s_std = style.mean((-2, -1), keepdim=True), style.std((-2, -1), keepdim=True) + eps
    return (content - c_mean) / c_std * s_std + s_mean
