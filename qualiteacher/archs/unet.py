"""A conventional restoration U-Net with the plug-in quality conditioning at its bottleneck."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.archs.conditioning import LevelEmbedding
from qualiteacher.archs.output import StudentOutput
from qualiteacher.archs.vqae import ResBlock


class ConditionedUNet(nn.Module):
    """Residual U-Net: ``image = x + net(x, level)``; ``LevelEmbedding`` is added at the bottleneck.

    Inputs of any size are replicate-padded to a multiple of ``2^(len(channel_mults)-1)`` and the
    output is cropped back. ``aux_loss`` is always a zero tensor.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_blocks: int = 1,
        n_levels: int = 8,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        self.downscale = 2 ** (len(widths) - 1)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = widths[0]
        for i, width in enumerate(widths):
            self.down_blocks.append(nn.Sequential(*[ResBlock(ch if j == 0 else width, width) for j in range(num_blocks)]))
            ch = width
            if i < len(widths) - 1:
                self.downs.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = ResBlock(ch, ch)
        self.level_embedding = LevelEmbedding(n_levels, ch)
        self.mid_out = ResBlock(ch, ch)
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.ups.append(nn.Conv2d(ch, width, 3, padding=1))
            self.up_blocks.append(nn.Sequential(*[ResBlock(2 * width if j == 0 else width, width) for j in range(num_blocks)]))
            ch = width
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    has_fidelity = False  # no fidelity dial: ``w`` is accepted and ignored

    @property
    def size_multiple(self) -> int:
        """Input sizes that need no padding are multiples of this."""
        return self.downscale

    def forward(self, x: Tensor, level: Tensor | None, w: float | Tensor | None = None) -> StudentOutput:
        if x.ndim != 4 or x.shape[1] != self.conv_in.in_channels:
            raise ValueError(f"ConditionedUNet expects (B, {self.conv_in.in_channels}, H, W), got {tuple(x.shape)}")
        h, wd = x.shape[-2:]
        # at least two cells at the coarsest scale: its group norms need more than one value a group
        pad_h = max(-h % self.downscale, 2 * self.downscale - h)
        pad_w = max(-wd % self.downscale, 2 * self.downscale - wd)
        inp = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        feat = self.conv_in(inp)
        skips = []
        for i, block in enumerate(self.down_blocks):
            feat = block(feat)
            if i < len(self.downs):
                skips.append(feat)
                feat = self.downs[i](feat)
        feat = self.mid_out(self.level_embedding(self.mid(feat), level))
        for up, block in zip(self.ups, self.up_blocks):
            feat = up(F.interpolate(feat, scale_factor=2.0, mode="nearest"))
            feat = block(torch.cat([feat, skips.pop()], dim=1))
        image = x + self.conv_out(feat)[..., :h, :wd]
        return StudentOutput(image, image.new_zeros(()))
