"""Code-prediction transformer: degraded-image features -> logits over both codebooks."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.archs.conditioning import AdaLNModulation


class CodeLogits(NamedTuple):
    """Per-position logits, (B, H, W, K_common) and (B, H, W, K_hq)."""

    common: Tensor
    hq: Tensor


class TransformerBlock(nn.Module):
    """Pre-LN self-attention + MLP block; with ``cond_dim`` it is adaLN-modulated by a level vector."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer width {dim} not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.ada = AdaLNModulation(cond_dim, dim) if cond_dim is not None else None

    def attention(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None or self.ada is None:
            x = x + self.attention(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        m = self.ada(cond)
        x = x + (1 + m.gate_attn) * self.attention(self.norm1(x) * (1 + m.scale_attn) + m.shift_attn)
        return x + (1 + m.gate_mlp) * self.mlp(self.norm2(x) * (1 + m.scale_mlp) + m.shift_mlp)


class CodeTransformer(nn.Module):
    """Predicts an index into each codebook for every latent position.

    Input: (B, in_channels, H, W) features of the degraded image; learned positions for a
    ``grid`` x ``grid`` latent (bilinearly resized for other sizes). ``cond_dim`` enables adaLN
    conditioning of every block by a (B, cond_dim) vector (``None`` vector = unconditioned).
    """

    def __init__(
        self,
        in_channels: int,
        num_codes_common: int,
        num_codes_hq: int,
        dim: int = 512,
        layers: int = 9,
        heads: int = 8,
        mlp_dim: int = 1024,
        grid: int = 16,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_channels, dim)
        self.pos = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_dim, cond_dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head_common = nn.Linear(dim, num_codes_common)
        self.head_hq = nn.Linear(dim, num_codes_hq)

    def forward(self, feature: Tensor, cond: Tensor | None = None) -> CodeLogits:
        b, _, h, w = feature.shape
        pos = self.pos if self.pos.shape[-2:] == (h, w) else F.interpolate(
            self.pos, size=(h, w), mode="bilinear", align_corners=False
        )
        x = self.proj_in(feature.flatten(2).transpose(1, 2)) + pos.flatten(2).transpose(1, 2)  # (B, HW, D)
        for block in self.blocks:
            x = block(x, cond)
        x = self.norm(x)
        return CodeLogits(self.head_common(x).view(b, h, w, -1), self.head_hq(x).view(b, h, w, -1))
