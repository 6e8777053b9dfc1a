"""Dual codebook: a common codebook for every image and an HQ codebook for high-quality ones."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from qualiteacher.archs.quantize import VectorQuantizer

Fusion = Literal["add", "attn"]


class DualQuantized(NamedTuple):
    """Result of :class:`DualCodebook`.

    z: (B, C, H, W) fused latent fed to the decoder.
    z_common, z_hq: (B, C, H, W) straight-through codes of each codebook (z_hq is zero where the
        HQ branch is off).
    indices_common, indices_hq: (B, H, W) long.
    hq_mask: (B,) bool, samples for which the HQ branch is active.
    loss: scalar, loss_common + loss_hq. loss_hq only counts samples in hq_mask.
    perplexity_common, perplexity_hq: scalars.
    """

    z: Tensor
    z_common: Tensor
    z_hq: Tensor
    indices_common: Tensor
    indices_hq: Tensor
    hq_mask: Tensor
    loss: Tensor
    loss_common: Tensor
    loss_hq: Tensor
    perplexity_common: Tensor
    perplexity_hq: Tensor


def hq_mask_from_quality(quality: Tensor | None, batch: int, threshold: float, device: torch.device) -> Tensor:
    """(B,) bool: quality >= threshold. NaN (unknown) counts as not HQ; ``None`` means all HQ."""
    if quality is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if quality.shape != (batch,):
        raise ValueError(f"quality must have shape ({batch},), got {tuple(quality.shape)}")
    return (quality >= threshold) & ~torch.isnan(quality)  # NaN >= t is already False; explicit


class CrossAttentionFusion(nn.Module):
    """z_common attends over the HQ codes of the same image; output projection zero-initialised."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion attention: dim {dim} not divisible by heads {heads}")
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, z_common: Tensor, z_hq: Tensor) -> Tensor:
        b, c, h, w = z_common.shape
        q = z_common.flatten(2).transpose(1, 2)  # (B, HW, C)
        kv = z_hq.flatten(2).transpose(1, 2)
        out, _ = self.attn(self.norm_q(q), self.norm_kv(kv), self.norm_kv(kv), need_weights=False)
        return out.transpose(1, 2).reshape(b, c, h, w)


class DualCodebook(nn.Module):
    """Common + HQ-specific codebooks with a per-sample HQ gate.

    The common codebook quantises the encoder output ``z_e``; the HQ codebook quantises the residual
    ``(z_e - sg(z_common)) / hq_weight`` so that ``z_common + hq_weight * z_hq`` approximates
    ``z_e`` (the "selected code sum" the stage-2 feature loss targets). Fusion "add" is exactly that
    sum; "attn" adds ``hq_weight * CrossAttn(z_common, z_hq) + hq_weight * z_hq`` with the attention
    part zero-initialised. Samples outside the HQ mask get no HQ contribution, no HQ loss and do not
    count in the HQ usage statistics.
    """

    def __init__(
        self,
        num_codes_common: int,
        num_codes_hq: int,
        dim: int,
        beta: float = 0.25,
        hq_weight: float = 0.8,
        hq_threshold: float = 0.70,
        fusion: Fusion = "add",
        attn_heads: int = 4,
    ) -> None:
        super().__init__()
        if fusion not in ("add", "attn"):
            raise ValueError(f"DualCodebook fusion must be 'add' or 'attn', got {fusion!r}")
        if hq_weight <= 0:
            raise ValueError(f"hq_weight must be > 0, got {hq_weight}")
        self.common = VectorQuantizer(num_codes_common, dim, beta)
        self.hq = VectorQuantizer(num_codes_hq, dim, beta)
        self.dim = dim
        self.hq_weight = hq_weight
        self.hq_threshold = hq_threshold
        self.fusion = fusion
        self.attn = CrossAttentionFusion(dim, _heads_for(dim, attn_heads)) if fusion == "attn" else None

    def forward(self, z_e: Tensor, quality: Tensor | None = None) -> DualQuantized:
        """Quantise ``z_e`` (B, C, H, W). ``quality`` (B,) fused scores; NaN = unknown = not HQ;
        ``None`` = every sample HQ (clean references, inference)."""
        mask = hq_mask_from_quality(quality, z_e.shape[0], self.hq_threshold, z_e.device)
        common = self.common(z_e)
        residual = (z_e - common.quantized.detach()) / self.hq_weight
        hq = self.hq(residual, mask)
        z_hq = hq.quantized * mask.to(z_e.dtype)[:, None, None, None]
        z = self.fuse(common.quantized, z_hq, mask)
        return DualQuantized(
            z=z,
            z_common=common.quantized,
            z_hq=z_hq,
            indices_common=common.indices,
            indices_hq=hq.indices,
            hq_mask=mask,
            loss=common.loss + hq.loss,
            loss_common=common.loss,
            loss_hq=hq.loss,
            perplexity_common=common.perplexity,
            perplexity_hq=hq.perplexity,
        )

    def fuse(self, z_common: Tensor, z_hq: Tensor, hq_mask: Tensor | None = None) -> Tensor:
        """Fused latent from the two code maps; ``hq_mask`` (B,) bool, ``None`` = all HQ."""
        if hq_mask is not None:
            z_hq = z_hq * hq_mask.to(z_hq.dtype)[:, None, None, None]
        z = z_common + self.hq_weight * z_hq
        if self.attn is not None:
            extra = self.attn(z_common, z_hq)
            if hq_mask is not None:
                extra = extra * hq_mask.to(extra.dtype)[:, None, None, None]
            z = z + self.hq_weight * extra
        return z

    def codes_from_indices(self, indices_common: Tensor, indices_hq: Tensor) -> Tensor:
        """Fused latent (all samples HQ) from two index maps (B, H, W)."""
        return self.fuse(self.common.codes_from_indices(indices_common), self.hq.codes_from_indices(indices_hq))


def _heads_for(dim: int, wanted: int) -> int:
    heads = min(wanted, dim)
    while dim % heads:
        heads -= 1
    return heads
