"""Pseudo-label and supervised reconstruction losses."""
from __future__ import annotations

import torch
from torch import Tensor


def masked_l1(output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-sample ``mean(|output - target| ⊙ mask)`` (N,), mask (N, 1, H, W) broadcast over channels."""
    return ((output - target).abs() * mask).mean(dim=(1, 2, 3))


def pseudo_label_loss(outputs: Tensor, labels: Tensor, masks: Tensor, owner: Tensor, batch: int) -> Tensor:
    """``L_pl = Σ_i mean(|S(x_s, q_i) - PL_i| ⊙ M_i)`` summed over each image's bank entries,
    averaged over the ``batch`` images (``owner`` maps entries to images)."""
    if outputs.shape[0] == 0:
        return outputs.new_zeros(())
    per_entry = masked_l1(outputs, labels, masks)                       # (N,)
    per_image = torch.zeros(batch, device=outputs.device, dtype=per_entry.dtype)
    per_image = per_image.index_add(0, owner, per_entry)
    return per_image.mean()
