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
