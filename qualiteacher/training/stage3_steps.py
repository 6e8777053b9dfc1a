"""The pieces of a stage-3 step (METHOD.md §4), as functions of tensors, networks and settings.

``QualiTeacherModule`` strings them together in ``training_step``; ``pipelines/benchmark_stage3.py``
calls the same pieces in its re-enactment of the released step structure.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.archs.conditioning import AdaLNModulation, LevelEmbedding
from qualiteacher.archs.context import fixed_prior_statistics, select_statistics
from qualiteacher.losses.preference import PreferenceLoss, RankedLevels
from qualiteacher.teacher.bank import PseudoLabelBank
from qualiteacher.teacher.views import VIEWS, apply_view
from qualiteacher.training.stage3_grading import Refresh
from qualiteacher.training.stage3_settings import LossWeights, OptimSettings


def strong_photometric(p: float = 0.8) -> nn.Module:
    """The student's strong photometric augmentation (brightness, contrast, sharpness, blur, posterize)."""
    return K.AugmentationSequential(
        K.ColorJitter(0.3, 0.3, 0.3, 0.0, p=p),
        K.RandomSharpness(sharpness=0.5, p=0.3),
        K.RandomGaussianBlur((5, 5), (0.1, 1.2), p=0.3),
        K.RandomPosterize(bits=(5, 8), p=0.2),
    )


def colour_jitter_like(photometric: nn.Module, images: Tensor, owner: Tensor) -> Tensor:
    """``images`` (N, 3, H, W) with the colour jitter that :func:`strong_photometric`'s last call
    gave batch image ``owner[i]`` (kornia's parameters reused, indexed by owner): the same
    brightness, contrast and saturation factors, and none where that image drew none. The rest of
    the strong view (sharpness, blur, posterize) is a degradation and stays on the input alone."""
    jitter, params = photometric[0], photometric._params[0]
    if not isinstance(jitter, K.ColorJitter) or params.name != "ColorJitter_0":
        raise TypeError("the strong view's first augmentation is not its colour jitter")
    batch = int(params.data["batch_prob"].shape[0])
    data = {k: v[owner.to(v.device)] if k not in ("order", "forward_input_shape") and torch.is_tensor(v)
            and v.ndim and v.shape[0] == batch else v for k, v in params.data.items()}
    data["forward_input_shape"] = torch.tensor(images.shape)
    return jitter(images, params=data).clamp(0, 1)


class Terms(NamedTuple):
    """The loss terms of one step (each a scalar); the metrics ``stage3/<name>``."""

    sup: Tensor
    pl: Tensor
    pref: PreferenceLoss
    crop: Tensor
    aux: Tensor
    sup_top: Tensor | None = None  # L_sup_top, when w_sup_top > 0


def weighted_total(w: LossWeights, t: Terms) -> Tensor:
    """``w_sup L_sup + w_pl L_pl + w_pref L_pref + w_crop L_crop + w_aux L_aux (+ w_sup_top L_sup_top)``."""
    total = w.sup * t.sup + w.pl * t.pl + w.pref * t.pref.total + w.crop * t.crop + w.aux * t.aux
    return total if t.sup_top is None else total + w.sup_top * t.sup_top


def no_preference(like: Tensor) -> PreferenceLoss:
    zero = like.new_zeros(())
    return PreferenceLoss(zero, zero, zero)


def supervised_loss(student: nn.Module, labeled: dict[str, Any], stats: dict[str, Tensor] | None = None,
                    level: int | None = None) -> tuple[Tensor, Tensor]:
    """``(L_sup, backbone loss)``: L1 of the student on the paired synthetic data (``stats``: the
    fusion prior's statistics of the whole images, per crop), unconditioned as METHOD.md trains it,
    or at ``level``. At the top level it is ``L_sup_top`` (``w_sup_top``): ``L_sup`` reaches the
    unconditioned path only, so without it nothing tells the top level that a clean photo (the
    clean -> clean pairs) must come back as it went in: the derain demo student returned a clean
    test photo at 17.5 dB at every level against 20.0 unconditioned (docs/results.md)."""
    lq = labeled["lq"]
    cond = None if level is None else torch.full((lq.shape[0],), level, dtype=torch.long, device=lq.device)
    with fixed_prior_statistics(student, stats):
        out = student(lq, cond)
    return F.l1_loss(out.image, labeled["gt"]), out.aux_loss


class BestPseudoLabels(NamedTuple):
    """The bank's entries of a batch as kept (before the step's geometric view): ``max_k r(PL_k)``."""

    images: Tensor   # (K, 3, H, W)
    scores: Tensor   # (K,) fused scores recorded by the bank
    owner: Tensor    # (K,) batch image of each


class PseudoLabelBatch(NamedTuple):
    """The pseudo-label part of a step, in the step's geometric view."""

    x_s: Tensor      # (B, 3, H, W) strong photometric view of the real images: the student's input
    targets: Tensor  # (N, 3, H, W) the bank's best k of each image, then this step's variants
    masks: Tensor    # (N, 1, H, W) their reliability masks
    levels: Tensor   # (N,) their levels under the current level rule
    owner: Tensor    # (N,) batch image of each target
    best: BestPseudoLabels
    stats: dict[str, Tensor] | None = None  # the fusion prior's statistics of the whole images, in x_s's view

    @property
    def size(self) -> int:
        """B, the number of real images."""
        return self.x_s.shape[0]


def relative_levels(scores: Tensor, owner: Tensor, top: int, spread: Literal["rank", "drop"] = "rank") -> Tensor:
    """Levels (N,) long by each candidate's drop below the best candidate of its own image: the
    best of every image at ``top``, the others over ``0 .. top - 1``; -1 for a non-finite score. The
    level then says how far a target is from the best its image got, not how the graders rate its
    content (a hard photo's best restoration can score below an easy photo's blurred copy).

    ``spread="rank"`` spreads them evenly by the rank of their drop in the batch (the smallest drop
    highest). ``spread="drop"`` makes the level fall in proportion to the drop itself:
    ``top - ceil(top * drop / d90)``, where ``d90`` is the batch's 90th-percentile drop, clamped to
    ``0``. Near-copies of the best (other views, a light variant) then stay near the top instead
    of filling the upper levels by rank."""
    if spread not in ("rank", "drop"):
        raise ValueError(f"relative_levels: spread must be 'rank' or 'drop', got {spread!r}")
    s = scores.detach().float()
    finite = torch.isfinite(s)
    s = torch.where(finite, s, torch.full_like(s, float("-inf")))
    n_img = int(owner.max()) + 1 if owner.numel() else 0
    best = torch.full((n_img,), float("-inf"), device=s.device).scatter_reduce(0, owner, s, reduce="amax")
    drop = best[owner] - s
    levels = torch.full_like(owner, top)
    below = (drop > 0) & finite
    n = int(below.sum())
    if n and spread == "drop":
        d = drop[below]
        scale = torch.quantile(d, 0.9).clamp_min(1e-12)
        levels[below] = (top - torch.ceil(top * d / scale)).clamp(0, top - 1).long()
    elif n:
        order = drop[below].argsort(stable=True)                      # ascending drop
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=order.device)
        levels[below] = top - 1 - torch.div(rank * top, n, rounding_mode="floor")
    return torch.where(finite, levels, torch.full_like(levels, -1))


def pseudo_label_batch(bank: PseudoLabelBank, unlabeled: dict[str, Any], fresh: Refresh | None,
                       levels_of: Callable[[Tensor, Tensor], Tensor], photometric: nn.Module,
                       generator: torch.Generator,
                       statistics: Callable[[Tensor], dict[str, Tensor] | None] | None = None,
                       jitter_targets: bool = False) -> PseudoLabelBatch:
    """The bank's best k of each unlabeled image plus this step's degraded variants (``fresh``),
    each at the level ``levels_of(scores, owner)`` gives it under the current level rule; one random geometric view
    for the batch, applied to the input and its targets alike; the student sees the input's strong
    photometric view. With ``unlabeled["context"]`` (the whole images) and ``statistics`` (the
    fusion prior's, :func:`~qualiteacher.archs.context.prior_statistics`), the whole images get the
    same photometric view (kornia's parameters reused) and their statistics come with the batch.
    ``jitter_targets``: each target gets its image's colour jitter too (:func:`colour_jitter_like`),
    so the student learns to keep the colours it is given rather than to undo a jitter it cannot see."""
    x_u = unlabeled["lq"]
    pls, masks, _, scores, owner = bank.gather(list(unlabeled["id"]), device=x_u.device)
    if owner.numel() == 0:
        raise RuntimeError("the pseudo-label bank holds nothing for this batch: the ensemble "
                           "returned no finite score for any candidate")
    best = BestPseudoLabels(pls, scores, owner)
    if fresh is not None and fresh.owner.numel():
        pls, masks = torch.cat([pls, fresh.variants]), torch.cat([masks, fresh.masks])
        scores, owner = torch.cat([scores, fresh.scores]), torch.cat([owner, fresh.owner])
    levels = levels_of(scores, owner)
    view = VIEWS[int(torch.randint(len(VIEWS), (1,), generator=generator))]
    x_u, pls, masks = (apply_view(t, view) for t in (x_u, pls, masks))
    x_s = photometric(x_u).clamp(0, 1)
    if jitter_targets:
        pls = colour_jitter_like(photometric, pls, owner)
    stats = None
    if statistics is not None and unlabeled.get("context") is not None:
        whole = apply_view(unlabeled["context"].to(x_u.device), view)
        stats = statistics(photometric(whole, params=photometric._params).clamp(0, 1))  # the crop's own view
    return PseudoLabelBatch(x_s, pls, masks, levels, owner, best, stats)


class StudentOutputs(NamedTuple):
    pl: Tensor              # (N, 3, H, W) the student at each target's level
    ranked: Tensor | None   # (m, B, 3, H, W) the student at the ranked levels (None: no preference part)
    top: Tensor | None      # (B, 3, H, W) the row of ``ranked`` at the top level (reused by L_crop)
    aux: Tensor             # backbone loss of the call


def conditioned_outputs(student: nn.Module, batch: PseudoLabelBatch, ranked: RankedLevels | None,
                        top_level: int, condition_on_level: bool = True) -> StudentOutputs:
    """Every condition of an image in one student forward: the targets' levels, then the ranked
    levels. ``condition_on_level=False`` asks for the top level throughout (the "-conditioning" ablation)."""
    x_s = batch.x_s
    inputs, conds, rows = [x_s[batch.owner]], [batch.levels], [batch.owner]
    if ranked is not None:
        inputs += [x_s] * ranked.levels.shape[0]
        conds += list(ranked.levels)
        rows += [torch.arange(batch.size, device=x_s.device)] * ranked.levels.shape[0]
    cond = torch.cat(conds)
    if not condition_on_level:
        cond = torch.full_like(cond, top_level)
    with fixed_prior_statistics(student, select_statistics(batch.stats, torch.cat(rows))):
        out = student(torch.cat(inputs), cond)
    n = batch.owner.numel()
    if ranked is None:
        return StudentOutputs(out.image[:n], None, None, out.aux_loss)
    outs = out.image[n:].view(-1, *x_s.shape)                                     # (m, B, 3, H, W)
    return StudentOutputs(out.image[:n], outs, outs[ranked.top], out.aux_loss)


@torch.no_grad()
def best_pl_reward(reward: Callable[[Tensor], Tensor], reward_is_fused: bool, best: BestPseudoLabels,
                   batch: int) -> Tensor:
    """``max_k r(PL_k)`` per image (B,) on the scale of ``reward``: the fused scores the bank
    recorded when the reward is the fused score (no member ``exclude``d), else the reward of the
    bank's pseudo-labels themselves (geometric views leave it unchanged up to borders)."""
    scores = best.scores if reward_is_fused else reward(best.images)
    return torch.full((batch,), -1e4, device=best.images.device).scatter_reduce(
        0, best.owner, scores.float(), reduce="amax")


def drop_non_finite_grads_(optimizer: torch.optim.Optimizer) -> bool:
    """Clear every gradient when one is not finite (a grader's feature at a degenerate output, an
    overflow): the optimizer then skips its weights. Whether it did."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return False
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    return True


def build_optimizer(student: nn.Module, o: OptimSettings, max_steps: int) -> Any:
    """AdamW over the student's trainable weights (the zero-initialised quality conditioning at
    ``cond_lr_mult × lr``: it starts from nothing), with the ``cosine`` schedule when asked."""
    cond = {id(p) for m in student.modules() if isinstance(m, (LevelEmbedding, AdaLNModulation)) for p in m.parameters()}
    trainable = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in cond]},
              {"params": [p for p in trainable if id(p) in cond], "lr": o.lr * o.cond_lr_mult}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.schedule == "constant":
        return opt
    if max_steps <= 0:
        raise ValueError("lr_schedule 'cosine' decays over trainer.max_steps: set it (> 0)")
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps, eta_min=0.0)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
