"""Stage 3's grading side (METHOD.md §2–3): the training ensemble, and the teacher's candidates
graded into the pseudo-label bank (``refresh_pseudo_labels``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from qualiteacher.iqa import presets
from qualiteacher.iqa.ensemble import with_reward_modes, without_members
from qualiteacher.teacher.bank import PseudoLabelBank
from qualiteacher.teacher.multiaug import multi_augment
from qualiteacher.teacher.views import apply_view, invert_view
from qualiteacher.training.stage3_settings import GradingSettings, TeacherSettings


def detached_members(ensemble: nn.Module, entries: tuple[str, ...], preset: str) -> dict[str, str]:
    """``reward_detach`` entries (member names or backends such as ``physical:haze_density``) ->
    ``{member: "detach"}`` for this task's ensemble. An entry no member of this task matches is
    skipped when it names a member of the preset for some task (one preset setting serves every
    task: dehaze's ``haze`` is derain's ``veil``); one that names nothing anywhere is an error."""
    specs = list(ensemble.specs)
    unmatched = [e for e in entries if not any(e in (s.name, s.backend) for s in specs)]
    if unmatched and preset in presets.PRESETS:
        known = {x for t in presets.TASKS for s in presets.preset_specs(preset, t) for x in (s.name, s.backend)}
        unmatched = [e for e in unmatched if e not in known]
    if unmatched:
        raise ValueError(f"reward_detach: {unmatched} match no member (members: {[s.name for s in specs]})")
    return {s.name: "detach" for s in specs if s.name in entries or s.backend in entries}


def training_ensemble(ensemble: nn.Module | None, g: GradingSettings) -> nn.Module:
    """The ensemble stage 3 trains with: ``ensemble`` (built from ``g`` when None) without the
    held-out members, with the detached reward members, frozen, at the members' precision."""
    if ensemble is None:
        ensemble = presets.build_ensemble(g.preset, task=g.task, weights_dir=g.weights_dir)
    if g.exclude:
        ensemble = without_members(ensemble, g.exclude)
    if g.reward_detach:
        ensemble = with_reward_modes(ensemble, detached_members(ensemble, g.reward_detach, g.preset))
    ensemble.requires_grad_(False)
    if hasattr(ensemble, "low_precision"):
        ensemble.low_precision = g.bf16
    return ensemble


def reliability_masks(ensemble: nn.Module, images: Tensor, fused: Tensor, block: int) -> Tensor:
    """(N, 1, H, W) per-pixel reliability of ``images`` (N, 3, H, W) whose fused scores are ``fused``."""
    h, w = images.shape[-2:]
    if block >= max(h, w):
        # one block covers the image: the mask is the image's own fused score
        return fused.view(-1, 1, 1, 1).expand(-1, 1, h, w)
    return ensemble.reliability_mask(images, block=block)


@torch.no_grad()
def record_scores_(pool: Tensor, ptr: Tensor, fused: Tensor) -> Tensor:
    """Write ``fused`` into the running ``pool`` of candidate scores at ``ptr`` (both updated in
    place, the oldest overwritten); returns the pool's finite scores."""
    n = fused.numel()
    idx = (ptr + torch.arange(n, device=fused.device)) % pool.numel()
    pool[idx] = fused.float()
    ptr.add_(n)
    return pool[torch.isfinite(pool)]


class Refresh(NamedTuple):
    variants: Tensor   # (N, 3, H, W) degraded pseudo-labels of this step (lower-level targets)
    masks: Tensor      # (N, 1, H, W) their reliability masks
    scores: Tensor     # (N,) their fused scores
    owner: Tensor      # (N,) index of the batch image each belongs to
    logs: dict[str, float]


@torch.no_grad()
def refresh_pseudo_labels(teacher: nn.Module, ensemble: nn.Module, bank: PseudoLabelBank, x: Tensor,
                          ids: list[str], s: TeacherSettings, use_mask: bool, generator: torch.Generator,
                          masks_of: Callable[[Tensor, Tensor], Tensor],
                          record_scores: Callable[[Tensor], None]) -> Refresh:
    """Teacher views + multi-augmented variants of ``x`` (B,3,H,W), graded in one call; the best
    enter the bank. ``masks_of(images, fused)`` gives reliability masks; ``record_scores(fused)``
    sees every candidate's score (the level rule). Returns the variants (lower-quality targets)."""
    b = x.shape[0]
    stacked = torch.cat([apply_view(x, v) for v in s.views])                    # (V*B, 3, H, W)
    restored = teacher(stacked, None).image.float().clamp(0, 1)  # fp32 candidates under bf16 autocast
    cands = torch.cat([invert_view(restored[i * b:(i + 1) * b], v) for i, v in enumerate(s.views)])
    owner = torch.arange(b, device=x.device).repeat(len(s.views))
    if s.n_aug_variants > 0:
        with torch.autocast(x.device.type, enabled=False):  # image processing in fp32 under bf16
            var = multi_augment(cands[:b], x.float(), s.n_aug_variants, s.aug_kinds, s.aug_max_strength,
                                generator=generator)
        cands = torch.cat([cands, var.images])
        owner = torch.cat([owner, var.source])
    fused = ensemble(cands).fused                                               # one batched call
    scorable = torch.isfinite(fused)  # a candidate the ensemble cannot judge (NaN) is left out, counted
    record_scores(fused)
    cand_ids = [ids[i] for i in owner.tolist()]
    keep = bank.accepts(cand_ids, fused).to(x.device)
    is_var = torch.arange(cands.shape[0], device=x.device) >= len(s.views) * b
    # masks only for the candidates that use them: bank entries and training variants
    need = (keep | (is_var & s.train_on_variants)) & scorable
    masks = torch.zeros_like(cands[:, :1]) if use_mask else torch.ones_like(cands[:, :1])
    if use_mask and need.any():
        masks[need] = masks_of(cands[need], fused[need])
    levels = ensemble.level_of(fused)
    kept = 0
    if keep.any():
        sel = keep.nonzero(as_tuple=True)[0]
        kept = bank.offer_batch([cand_ids[i] for i in sel.tolist()], cands[sel], masks[sel], fused[sel], levels[sel])
    logs = {"cand_score": float(fused[scorable].mean()) if scorable.any() else float("nan"),
            "cand_kept": float(kept), "cand_unscorable": float((~scorable).sum())}
    v = (is_var & scorable) if s.train_on_variants else torch.zeros_like(is_var)
    return Refresh(cands[v], masks[v], fused[v], owner[v], logs)
