"""Vector quantiser: nearest-code lookup with a straight-through estimator."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Quantized(NamedTuple):
    """Result of :class:`VectorQuantizer`.

    quantized: (B, C, H, W) codes with straight-through gradients to the input.
    indices: (B, H, W) long code indices.
    loss: scalar, codebook loss + beta * commitment loss (over the masked samples only).
    perplexity: scalar, exp(entropy) of the code histogram of this batch.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor


def nearest_code(flat: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row (squared L2) for each row of ``flat`` (N, C) -> (N,).

    Always computed in float32: under an autocast region (``bf16-mixed``) the matrix product would
    otherwise run in bfloat16 whatever the input dtype, and near-ties pick other codes.
    """
    with torch.autocast(flat.device.type, enabled=False):
        flat, codebook = flat.float(), codebook.float()
        # ||z||^2 - 2 z.e + ||e||^2, one matrix product for the whole batch
        dist = torch.addmm(codebook.pow(2).sum(1)[None], flat, codebook.t(), alpha=-2.0)
        dist = dist + flat.pow(2).sum(1, keepdim=True)
        return dist.argmin(dim=1)


def perplexity_of(indices: Tensor, num_codes: int) -> Tensor:
    """exp(entropy) of the histogram of ``indices``; 1 = one code used, num_codes = uniform use."""
    if indices.numel() == 0:
        return torch.ones((), device=indices.device)
    probs = torch.bincount(indices.flatten(), minlength=num_codes).float() / indices.numel()
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())


class VectorQuantizer(nn.Module):
    """Codebook of ``num_codes`` vectors of size ``dim``; loss = ||sg(z)-e||² + beta ||z-sg(e)||².

    ``forward(z, mask)``: ``mask`` (B,) bool selects the samples that contribute to the loss and to
    the usage statistics (``None`` = all). Usage counts accumulate in the ``usage`` buffer in
    training mode; :meth:`dead_codes` counts entries never selected since the last reset.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer needs num_codes >= 1 and dim >= 1, got {num_codes}, {dim}")
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        self.register_buffer("usage", torch.zeros(num_codes), persistent=True)

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Quantized:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.dim}, H, W), got {tuple(z.shape)}")
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*H*W, C)
        with torch.no_grad():
            indices = nearest_code(flat, self.embedding.weight).view(b, h, w)
        q = self.codes_from_indices(indices)  # (B, C, H, W)

        if mask is None:
            mask = torch.ones(b, dtype=torch.bool, device=z.device)
        weight = mask.to(z.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        denom = (mask.sum() * c * h * w).clamp_min(1).to(z.dtype)
        codebook_loss = ((q - z.detach()).pow(2) * weight).sum() / denom
        commitment = ((z - q.detach()).pow(2) * weight).sum() / denom
        loss = codebook_loss + self.beta * commitment

        used = indices[mask]
        if self.training:
            with torch.no_grad():
                self.usage += torch.bincount(used.flatten(), minlength=self.num_codes).to(self.usage)
        quantized = z + (q - z).detach()  # straight-through
        return Quantized(quantized, indices, loss, perplexity_of(used, self.num_codes))

    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """Look up codes: (B, H, W) long -> (B, C, H, W)."""
        if indices.dtype != torch.long:
            raise TypeError(f"codes_from_indices expects long indices, got {indices.dtype}")
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def codes_from_probs(self, probs: Tensor) -> Tensor:
        """Expected code under a distribution over codes: (B, H, W, K) -> (B, C, H, W)."""
        if probs.shape[-1] != self.num_codes:
            raise ValueError(f"codes_from_probs expects last dim {self.num_codes}, got {probs.shape[-1]}")
        return (probs @ self.embedding.weight).permute(0, 3, 1, 2).contiguous()

    def dead_codes(self) -> Tensor:
        """Number of codes never selected since the last :meth:`reset_usage`."""
        return (self.usage == 0).sum()

    def reset_usage(self) -> None:
        """Zero the usage counts."""
        self.usage.zero_()

    @torch.no_grad()
    def restart_dead_codes_(self, samples: Tensor, generator: torch.Generator | None = None) -> int:
        """Move every code unused since the last :meth:`reset_usage` onto a random row of
        ``samples`` (N, dim) — encoder outputs of the current batch — and reset the usage counts;
        returns the number of codes moved. A codebook that collapses to a few codes (the demo's
        stage 1 ended using about 16 of 256) cannot carry a scene's colours; restarting dead codes
        on live data is the standard remedy (as in k-means, Jukebox, vector-quantize-pytorch)."""
        if samples.ndim != 2 or samples.shape[1] != self.dim:
            raise ValueError(f"restart_dead_codes_ expects samples (N, {self.dim}), got {tuple(samples.shape)}")
        dead = (self.usage == 0).nonzero().flatten()
        if dead.numel() and samples.shape[0]:
            pick = torch.randint(0, samples.shape[0], (dead.numel(),), generator=generator,
                                 device=generator.device if generator is not None else samples.device)
            self.embedding.weight[dead] = samples[pick.to(samples.device)].to(self.embedding.weight)
        self.reset_usage()
        return int(dead.numel())
