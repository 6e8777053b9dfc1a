"""DPO-style score-preference losses: a Bradley–Terry reward margin, no reference policy."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceLoss(NamedTuple):
    total: Tensor   # λ (L_a + λ₂ L_b)
    l_a: Tensor     # top level preferred over a lower level
    l_b: Tensor     # top level preferred over the best pseudo-label


def preference_loss(r_top: Tensor, r_low: Tensor, r_pl_best: Tensor, beta: float = 1.0,
                    delta: float = 0.1, lam: float = 1.0, lam2: float = 0.5) -> PreferenceLoss:
    """``L_a = -log σ(β (r_top - r_low - δ))``, ``L_b = -log σ(β (r_top - r_pl_best))``, batch means.

    ``r_top`` = r(S(x, 7)), ``r_low`` = r(S(x, q_l)), ``r_pl_best`` = max_k r(PL_k) (detached here:
    the teacher's rewards are targets, never trained).
    """
    l_a = -F.logsigmoid(beta * (r_top - r_low - delta)).mean()
    l_b = -F.logsigmoid(beta * (r_top - r_pl_best.detach())).mean()
    return PreferenceLoss(lam * (l_a + lam2 * l_b), l_a, l_b)


def all_pairs_preference_loss(rewards: Tensor, levels: Tensor, beta: float = 1.0,
                              delta_per_level: float = 0.05) -> Tensor:
    """Bradley–Terry loss over every ordered pair of levels of the same image.

    ``rewards`` (B, L): the reward of the output at each of ``levels`` (L,). For every pair
    ``i > j`` (by level) the margin is ``δ · (level_i - level_j)``, so wider gaps must separate
    more. Returns the mean over pairs and images.
    """
    if rewards.ndim != 2 or rewards.shape[1] != levels.numel() or levels.numel() < 2:
        raise ValueError(f"rewards must be (B, L>=2) matching levels, got {tuple(rewards.shape)}")
    gap = (levels[:, None] - levels[None, :]).to(rewards.dtype)        # (L, L): level_i - level_j
    diff = rewards[:, :, None] - rewards[:, None, :]                    # (B, L, L): r_i - r_j
    pairs = gap > 0
    losses = -F.logsigmoid(beta * (diff - delta_per_level * gap))       # (B, L, L)
    return losses[:, pairs].mean()


def draw_low_levels(batch: int, choices: tuple[int, ...] = (4, 5, 6),
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """The lower levels ``q_l`` compared with the top level, one per image."""
    idx = torch.randint(len(choices), (batch,), generator=generator)
    return torch.tensor(choices)[idx].to(device)


def draw_level_subsets(batch: int, grid: Tensor, m: int, keep: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Per image, ``m`` distinct levels of ``grid`` (L,), sorted ascending: (B, m).

    Drawn uniformly without replacement; ``keep`` (a level of the grid, e.g. the top level) is in
    every subset and the other ``m - 1`` are drawn from the rest.
    """
    grid = grid.flatten()
    n = grid.numel()
    if not 2 <= m <= n:
        raise ValueError(f"a subset of m={m} levels needs 2 <= m <= {n} (the grid size)")
    if keep is None:
        idx = torch.rand(batch, n, generator=generator).argsort(1)[:, :m].to(grid.device)
        return grid[idx].sort(1).values
    others = grid[grid != keep]
    if others.numel() != n - 1:
        raise ValueError(f"keep={keep} must be one level of the grid {grid.tolist()}")
    idx = torch.rand(batch, n - 1, generator=generator).argsort(1)[:, : m - 1].to(grid.device)
    kept = torch.full((batch, 1), keep, dtype=grid.dtype, device=grid.device)
    return torch.cat([others[idx], kept], 1).sort(1).values


def pair_inclusion_probability(n: int, m: int, keep: int | None, level_i: Tensor, level_j: Tensor) -> Tensor:
    """Probability that both levels of a pair are in a subset drawn by ``draw_level_subsets``."""
    if keep is None:
        p = m * (m - 1) / (n * (n - 1))
        return torch.full(level_i.shape, p, dtype=torch.float64, device=level_i.device)
    with_keep = torch.full(level_i.shape, (m - 1) / (n - 1), dtype=torch.float64, device=level_i.device)
    p_rest = (m - 1) * (m - 2) / ((n - 1) * (n - 2)) if n > 2 else 1.0
    return torch.where((level_i == keep) | (level_j == keep), with_keep, torch.full_like(with_keep, p_rest))


def sampled_all_pairs_preference_loss(rewards: Tensor, levels: Tensor, n_levels: int, keep: int | None = None,
                                      beta: float = 1.0, delta_per_level: float = 0.05) -> Tensor:
    """Unbiased estimate of ``all_pairs_preference_loss`` over a grid of ``n_levels`` levels from
    per-image subsets: ``rewards`` (B, m) at ``levels`` (B, m) drawn by ``draw_level_subsets``.

    Each pair's loss is divided by its probability of being drawn (Horvitz-Thompson) and the sum is
    divided by the number of (image, pair) terms of the full loss, so the expectation over the draws
    equals the full loss. With ``keep=None`` this is the plain mean over the drawn pairs.
    """
    if rewards.shape != levels.shape or rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards and levels must both be (B, m>=2), got {tuple(rewards.shape)}, "
                         f"{tuple(levels.shape)}")
    b, m = rewards.shape
    if keep is not None and m < 3 and n_levels > m:
        raise ValueError("with a kept level, subsets need m >= 3 levels so that every pair can be drawn")
    gap = (levels[:, :, None] - levels[:, None, :]).to(rewards.dtype)             # (B, m, m)
    diff = rewards[:, :, None] - rewards[:, None, :]                                # (B, m, m)
    losses = -F.logsigmoid(beta * (diff - delta_per_level * gap))
    li, lj = levels[:, :, None].expand(-1, m, m), levels[:, None, :].expand(-1, m, m)
    prob = pair_inclusion_probability(n_levels, m, keep, li, lj).to(rewards.dtype)
    weighted = torch.where(gap > 0, losses / prob, torch.zeros_like(losses))
    return weighted.sum() / (b * n_levels * (n_levels - 1) / 2)
