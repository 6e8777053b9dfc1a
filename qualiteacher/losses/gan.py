"""Hinge adversarial losses and the VQGAN-style adaptive generator weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss: -mean(D(fake))."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||grad_last(rec)|| / (||grad_last(g)|| + 1e-4), clamped to [0, max_weight], detached.

    Balances the adversarial gradient against the reconstruction gradient at the decoder's last
    layer; both losses must still have their graphs (they are kept for the later backward).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
