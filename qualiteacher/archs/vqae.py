"""Convolutional VQ autoencoder: encoder, decoder and the stage-1 autoencoder around a dual codebook."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.archs.codebooks import DualCodebook, DualQuantized


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``channels``."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 skip when the width changes."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (B, 1, HW, C) each, channels contiguous: with a strided channel axis torch falls back to
        # the math kernel, which holds the HW x HW matrix (2 GB for a 512-px demo tile)
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous().unsqueeze(1)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


def _stage(in_ch: int, out_ch: int, n_blocks: int, attn: bool) -> tuple[nn.ModuleList, int]:
    blocks = nn.ModuleList()
    for _ in range(n_blocks):
        blocks.append(ResBlock(in_ch, out_ch))
        in_ch = out_ch
        if attn:
            blocks.append(AttnBlock(out_ch))
    return blocks, in_ch


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, latent_channels, H/2^(L-1), W/2^(L-1)), L = len(channel_mults).

    ``attn_resolutions`` are feature sizes (for a ``resolution`` px input) that get attention blocks;
    the network is fully convolutional and runs at any size divisible by ``downscale``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2, 4, 4, 8),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 512,
        latent_channels: int = 256,
    ) -> None:
        super().__init__()
        self.downscale = 2 ** (len(channel_mults) - 1)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch, res = base_channels, resolution
        for i, mult in enumerate(channel_mults):
            blocks, ch = _stage(ch, base_channels * mult, num_res_blocks, res in attn_resolutions)
            self.levels.append(blocks)
            last = i == len(channel_mults) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            res = res if last else res // 2
        self.mid = nn.Sequential(ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[0]

    def features(self, x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """The latent and every level's feature before downsampling, keyed by downscale factor
        (1 = input resolution): what the fidelity path fuses into the decoder."""
        h = self.conv_in(x)
        skips: dict[int, Tensor] = {}
        for i, (blocks, down) in enumerate(zip(self.levels, self.downs)):
            for block in blocks:
                h = block(h)
            skips[2 ** i] = h
            h = down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h))), skips


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*2^(L-1), w*2^(L-1)); mirrors Encoder."""

    def __init__(
        self,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2, 4, 4, 8),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 512,
        latent_channels: int = 256,
    ) -> None:
        super().__init__()
        ch = base_channels * channel_mults[-1]
        res = resolution // 2 ** (len(channel_mults) - 1)
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch))
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            blocks, ch = _stage(ch, base_channels * mult, num_res_blocks + 1, res in attn_resolutions)
            self.levels.append(blocks)
            self.ups.append(nn.Conv2d(ch, ch, 3, padding=1) if i > 0 else nn.Identity())
            res = res * 2 if i > 0 else res
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor, fuse: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
        """``fuse(factor, h)`` (optional) transforms the feature of each level after its blocks,
        before upsampling; ``factor`` is the level's downscale relative to the output (1 = full size)."""
        h = self.mid(self.conv_in(z))
        n = len(self.levels)
        for i, (blocks, up) in enumerate(zip(self.levels, self.ups)):
            for block in blocks:
                h = block(h)
            if fuse is not None:
                h = fuse(2 ** (n - 1 - i), h)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final convolution (for the adaptive GAN weight)."""
        return self.conv_out.weight


class AutoencoderOutput(NamedTuple):
    """image: (B, 3, H, W) reconstruction; latent: (B, C, h, w) encoder output; quant: codebook result."""

    image: Tensor
    latent: Tensor
    quant: DualQuantized


class VQAutoencoder(nn.Module):
    """Stage-1 autoencoder: encoder -> dual codebook (HQ branch gated by quality) -> decoder."""

    def __init__(self, encoder: Encoder, decoder: Decoder, codebook: DualCodebook) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.codebook = codebook

    def forward(self, x: Tensor, quality: Tensor | None = None) -> AutoencoderOutput:
        """``quality`` (B,) fused scores, NaN = unknown (not HQ), ``None`` = all HQ."""
        check_divisible(x, self.encoder.downscale, "VQAutoencoder")
        latent = self.encoder(x)
        quant = self.codebook(latent, quality)
        return AutoencoderOutput(self.decoder(quant.z), latent, quant)


def check_divisible(x: Tensor, factor: int, who: str) -> None:
    """Raise a clear error unless ``x`` is (B, 3, H, W) with H and W divisible by ``factor``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{who} expects images (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"{who}: image size {tuple(x.shape[-2:])} must be divisible by {factor}")
