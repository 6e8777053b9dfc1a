"""Quality-level conditioning: zero-initialised level embeddings ("add") and adaLN modulation."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

CondMode = Literal["add", "adaln"]


def check_level(level: Tensor, n_levels: int, batch: int) -> None:
    """Raise a clear error unless ``level`` is a (B,) integer tensor in [0, n_levels)."""
    if level.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"quality level must be an integer tensor, got {level.dtype}")
    if level.shape != (batch,):
        raise ValueError(f"quality level must have shape ({batch},), got {tuple(level.shape)}")
    if level.numel() and (int(level.min()) < 0 or int(level.max()) >= n_levels):
        raise ValueError(f"quality level must lie in 0..{n_levels - 1}, got {level.tolist()}")


class LevelEmbedding(nn.Module):
    """Plug-in conditioning: adds a learned (B, C, 1, 1) level embedding to a feature map.

    Zero-initialised, so a backbone it is attached to behaves exactly as before until trained;
    ``level=None`` leaves the feature unchanged (unconditioned, as the teacher runs).
    """

    def __init__(self, n_levels: int, channels: int) -> None:
        super().__init__()
        self.n_levels = n_levels
        self.embedding = nn.Embedding(n_levels, channels)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, feature: Tensor, level: Tensor | None) -> Tensor:
        if level is None:
            return feature
        check_level(level, self.n_levels, feature.shape[0])
        return feature + self.embedding(level).to(feature.dtype)[:, :, None, None]


class Modulation(NamedTuple):
    """adaLN parameters for one transformer block, each (B, 1, D); gates act as (1 + gate)."""

    shift_attn: Tensor
    scale_attn: Tensor
    gate_attn: Tensor
    shift_mlp: Tensor
    scale_mlp: Tensor
    gate_mlp: Tensor


class AdaLNModulation(nn.Module):
    """Condition vector (B, Dc) -> :class:`Modulation` for a block of width ``dim``.

    The projection is zero-initialised: shift = scale = gate = 0, and since the block applies
    ``x * (1 + scale) + shift`` and ``(1 + gate) * branch``, a fresh block is exactly unconditioned.
    """

    def __init__(self, cond_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, cond: Tensor) -> Modulation:
        return Modulation(*self.proj(cond)[:, None, :].chunk(6, dim=-1))


class QualityConditioning(nn.Module):
    """Level conditioning of the IQPIR student, in one of two modes.

    "add": :class:`LevelEmbedding` added to the LQ encoder feature (``feature`` hook).
    "adaln": a level vector (``vector`` hook) that every transformer block turns into adaLN
    shift/scale/gate through its own zero-initialised :class:`AdaLNModulation`.
    """

    def __init__(self, mode: CondMode, n_levels: int, feature_channels: int, cond_dim: int) -> None:
        super().__init__()
        if mode not in ("add", "adaln"):
            raise ValueError(f"conditioning mode must be 'add' or 'adaln', got {mode!r}")
        self.mode = mode
        self.n_levels = n_levels
        self.cond_dim = cond_dim
        self.add = LevelEmbedding(n_levels, feature_channels) if mode == "add" else None
        # random init: the per-block projections are zero, so the output starts unconditioned anyway
        self.vectors = nn.Embedding(n_levels, cond_dim) if mode == "adaln" else None

    def feature(self, feature: Tensor, level: Tensor | None) -> Tensor:
        """Feature with the level embedding added ("add" mode); unchanged otherwise."""
        return self.add(feature, level) if self.add is not None else feature

    def vector(self, level: Tensor | None, batch: int) -> Tensor | None:
        """(B, cond_dim) level vector in "adaln" mode; ``None`` in "add" mode or when unconditioned."""
        if self.vectors is None or level is None:
            return None
        check_level(level, self.n_levels, batch)
        return self.vectors(level)
