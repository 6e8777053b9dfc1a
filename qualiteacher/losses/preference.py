"""DPO-style score-preference losses: a Bradley–Terry reward margin, no reference policy.

Stage 3 asks two things of this module: which levels to rank this step (:func:`draw_ranked_levels`)
and the preference term of their rewards (:func:`preference_term`); both follow one
:class:`PreferenceSettings`. The formulas underneath are pure functions on tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PreferenceSettings:
    """METHOD.md §4's score preference (stage 3's ``pref_*``, ``low_levels``, ``top_level``).

    ``mode``: ``pair`` (``λ (L_a + λ₂ L_b)``: the top level against one lower level drawn from
    ``low_levels``, and against the best pseudo-label) or ``all_pairs`` (every ordered pair of the
    levels ``low_levels ∪ {top_level}``, the margin growing with the level gap; ``levels_per_step``
    ranks a random subset of them per image, the top level always in, with an unbiased estimate).
    """

    mode: Literal["pair", "all_pairs"]
    beta: float                  # β
    delta: float                 # δ (all_pairs: the margin of the widest gap)
    lam: float                   # λ
    lam2: float                  # λ₂ (pair only)
    low_levels: tuple[int, ...]  # the levels below the top that are ranked
    top_level: int
    levels_per_step: int | None  # all_pairs: levels ranked per image and step (None: all)
    start_step: int              # the step N it starts at

    def __post_init__(self) -> None:
        if self.mode not in ("pair", "all_pairs"):
            raise ValueError(f"pref_mode must be pair or all_pairs, got {self.mode!r}")
        if self.levels_per_step is not None and self.levels_per_step < 3:
            raise ValueError(f"pref_levels_per_step must be >= 3 or None, got {self.levels_per_step}")
        if not all(0 <= q < self.top_level for q in self.low_levels):
            raise ValueError(f"low_levels {self.low_levels} must lie in [0, top_level={self.top_level})")

    @property
    def grid(self) -> tuple[int, ...]:
        """The levels ``all_pairs`` ranks, ascending (the top level last)."""
        return tuple(sorted(set(self.low_levels) | {self.top_level}))

    @property
    def uses_best_pseudo_label(self) -> bool:
        """Whether :func:`preference_term` needs ``max_k r(PL_k)`` (``L_b``)."""
        return self.mode == "pair"


class PreferenceLoss(NamedTuple):
    total: Tensor   # λ (L_a + λ₂ L_b); all_pairs: λ × the all-pairs loss
    l_a: Tensor     # top level preferred over a lower level (0 in all_pairs mode)
    l_b: Tensor     # top level preferred over the best pseudo-label (0 in all_pairs mode)


class RankedLevels(NamedTuple):
    levels: Tensor  # (m, B) the levels each image's outputs are ranked at
    top: int        # the row of the top level (pair: 0, then the lower level; all_pairs: the last row)


def draw_ranked_levels(s: PreferenceSettings, batch: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> RankedLevels:
    """The levels the preference term ranks this step, per image."""
    if s.mode == "pair":
        top = torch.full((batch,), s.top_level, device=device)
        return RankedLevels(torch.stack([top, draw_low_levels(batch, s.low_levels, generator, device)]), 0)
    grid = torch.tensor(s.grid, device=device)
    levels = grid[:, None].expand(-1, batch)                                       # (L, B)
    if s.levels_per_step is not None and s.levels_per_step < grid.numel():
        # a random subset per image, the top level always in (sorted: it is the last row)
        levels = draw_level_subsets(batch, grid, s.levels_per_step, s.top_level, generator).T  # (m, B)
    return RankedLevels(levels, levels.shape[0] - 1)


def preference_term(s: PreferenceSettings, rewards: Tensor, levels: Tensor,
                    r_pl_best: Tensor | None = None) -> PreferenceLoss:
    """``L_pref`` of the rewards (m, B) of the student's outputs at ``levels`` (m, B) from
    :func:`draw_ranked_levels`; λ is applied here, once. ``pair`` needs ``r_pl_best`` (B,) =
    ``max_k r(PL_k)``; ``all_pairs`` gives the full loss, or its unbiased estimate when fewer
    levels than the grid were ranked."""
    if s.mode == "pair":
        if r_pl_best is None:
            raise ValueError("pref_mode 'pair' needs r_pl_best, the best pseudo-label's reward (L_b)")
        return preference_loss(rewards[0], rewards[1], r_pl_best, s.beta, s.delta, s.lam, s.lam2)
    per_level = s.delta / max(1, s.top_level - min(s.low_levels))  # the widest gap (top vs lowest) gets δ
    n_grid = len(s.grid)
    if levels.shape[0] < n_grid:
        loss = sampled_all_pairs_preference_loss(rewards.T, levels.T, n_grid, s.top_level, s.beta, per_level)
    else:
        loss = all_pairs_preference_loss(rewards.T, levels[:, 0], s.beta, per_level)
    zero = loss.new_zeros(())
    return PreferenceLoss(s.lam * loss, zero, zero)


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
