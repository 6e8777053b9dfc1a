"""Stage 3: QualiTeacher — Mean Teacher with quality-conditioned pseudo-labels (METHOD.md §3–4).

``training_step`` reads like the method: refresh pseudo-labels, then the supervised part, the
pseudo-label part, the preference part and the consistency part. The maths lives in
``qualiteacher.losses`` and ``qualiteacher.teacher``; this module is glue.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import kornia.augmentation as K
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.archs.conditioning import AdaLNModulation, LevelEmbedding
from qualiteacher.archs.iqpir import freeze_prior_
from qualiteacher.losses.consistency import crop_consistency_loss, random_window
from qualiteacher.losses.preference import (
    all_pairs_preference_loss,
    draw_level_subsets,
    draw_low_levels,
    preference_loss,
    sampled_all_pairs_preference_loss,
)
from qualiteacher.losses.pseudo import pseudo_label_loss
from qualiteacher.teacher.bank import PseudoLabelBank, merge_indexes
from qualiteacher.teacher.bank_store import DiskStore
from qualiteacher.teacher.ema import ema_update_, make_teacher
from qualiteacher.teacher.multiaug import AUGMENTATIONS, multi_augment
from qualiteacher.teacher.views import VIEWS, apply_view, check_views, invert_view
from qualiteacher.training.distributed import all_gather_objects, rank_seed, set_conditioning_trainable_
from qualiteacher.training.students import build_student, load_student_weights

_FROZEN_PREFIXES = ("ensemble.",)


def strong_photometric(p: float = 0.8) -> nn.Module:
    """The student's strong photometric augmentation (brightness, contrast, sharpness, blur, posterize)."""
    return K.AugmentationSequential(
        K.ColorJitter(0.3, 0.3, 0.3, 0.0, p=p),
        K.RandomSharpness(sharpness=0.5, p=0.3),
        K.RandomGaussianBlur((5, 5), (0.1, 1.2), p=0.3),
        K.RandomPosterize(bits=(5, 8), p=0.2),
    )


def detached_members(ensemble: nn.Module, entries: tuple[str, ...], preset: str) -> dict[str, str]:
    """``reward_detach`` entries (member names or backends such as ``physical:haze_density``) ->
    ``{member: "detach"}`` for this task's ensemble. An entry no member of this task matches is
    skipped when it names a member of the preset for some task (one preset setting serves every
    task: dehaze's ``haze`` is derain's ``veil``); one that names nothing anywhere is an error."""
    from qualiteacher.iqa.presets import PRESETS, TASKS, preset_specs

    specs = list(ensemble.specs)
    unmatched = [e for e in entries if not any(e in (s.name, s.backend) for s in specs)]
    if unmatched and preset in PRESETS:
        known = {x for t in TASKS for s in preset_specs(preset, t) for x in (s.name, s.backend)}
        unmatched = [e for e in unmatched if e not in known]
    if unmatched:
        raise ValueError(f"reward_detach: {unmatched} match no member (members: {[s.name for s in specs]})")
    return {s.name: "detach" for s in specs if s.name in entries or s.backend in entries}


class Refresh(NamedTuple):
    variants: Tensor   # (N, 3, H, W) degraded pseudo-labels of this step (lower-level targets)
    masks: Tensor      # (N, 1, H, W) their reliability masks
    scores: Tensor     # (N,) their fused scores
    owner: Tensor      # (N,) index of the batch image each belongs to
    logs: dict[str, float]


class QualiTeacherModule(L.LightningModule):
    """Quality-conditioned Mean-Teacher training on paired synthetic + unlabeled real batches.

    Args:
        student: ``iqpir`` (codebook student) or ``unet`` (plug-in conditioned U-Net).
        preset: architecture preset (``tiny``, ``base``, ``paper``).
        cond_mode: quality conditioning of the IQPIR transformer, ``add`` or ``adaln``.
        init_from: checkpoint of the warmed-up student (the fidelity stage for IQPIR, the warm-up
            for the U-Net); loaded in ``setup``.
        fidelity_w: IQPIR's fidelity weight ``w`` the student trains and runs at (its default at
            inference); adain: AdaIN colour re-normalisation of the quantised latent.
        iqa_preset / task / iqa_weights_dir: the IQA ensemble (frozen, never checkpointed).
        ema_decay: teacher EMA decay ``d``. bank_k: candidates kept per unlabeled image.
        bank_dir: folder of the pseudo-label bank's entries (one file per kept candidate; the
            checkpoints hold only the index). ``None`` keeps them in RAM and inside checkpoints
            (tiny runs; not under DDP). bank_cache: entries the disk bank keeps in RAM.
        seed: run seed; rank r of a DDP run draws from ``rank_seed(seed, r)``.
        views: teacher views; n_aug_variants / aug_kinds / aug_max_strength: multi-augmentation.
        cond_lr_mult: learning-rate multiplier of the (zero-initialised) quality conditioning.
        lr_schedule: ``constant`` or ``cosine`` (every group's rate decays to 0 over ``trainer.max_steps``:
            the last student is a settled one, not the noisiest point of the run).
        w_*: loss weights; pref_start_step / crop_start_step: the step ``N`` they start at.
        pref_mode: ``pair`` (METHOD.md L_a + λ₂ L_b) or ``all_pairs`` (every ordered level pair).
        pref_levels_per_step: ``all_pairs`` only: rank a random subset of this many levels per image
            and step (the top level always in), with an unbiased estimate of the all-pairs loss;
            None ranks every level.
        crop_windows: ``aligned`` (same window for both sides) or ``independent`` (as released).
        mask_block: block size of the per-pixel reliability mask.
        refresh_every: grade new candidates every n steps (and whenever an image is new to the bank).
        train_on_variants: the step's multi-augmented variants are PL targets too (at their own,
            lower levels) besides the bank's best k: the student sees the whole quality range.
        level_rule: ``default`` (METHOD.md: 8 levels from the fused score) or ``quantile``
            (levels spread evenly over a running pool of the last ``level_pool_size`` candidate scores).
        mode: ``qualiteacher`` (the method); ``supervised`` (L_sup alone on the paired data: the
            unlabeled batch, the teacher's pseudo-labels, the bank and the ensemble are never used);
            ``mean_teacher`` (plain Mean Teacher: EMA teacher, views, best-k bank, masked L1 to the
            bank's pseudo-labels, student unconditioned; multi-augmentation, preference and
            consistency are off whatever their settings). ``study.modes`` names the variants.
        use_mask: weight the pseudo-label loss by the reliability mask (False: uniform weight 1).
        condition_on_level: condition the student on each pseudo-label's level (False: every
            student call at ``top_level``, the "-conditioning" ablation).
        iqa_exclude: ensemble members left out of training altogether (grading, levels, masks,
            reward): a held-out member to score the results with afterwards.
        reward_detach: members that grade and count in the reward's value but pass no gradient to
            the student (reward_mode ``detach``): members a generator can climb without restoring
            (e.g. colourfulness, which chroma speckle raises).
        compile_student: ``torch.compile`` the student (first steps compile; worth it on long GPU runs).
        iqa_bf16: IQA members that are networks (MUSIQ, CLIP, ...) run in bf16 autocast and
            channels_last; NIQE / BRISQUE / PIQE / physical members always run in float32.
    """

    def __init__(
        self,
        student: Literal["iqpir", "unet"] = "iqpir",
        preset: str = "tiny",
        cond_mode: Literal["add", "adaln"] = "add",
        init_from: str | None = None,
        fidelity_w: float = 1.0,
        adain: bool = False,
        iqa_preset: str = "offline",
        task: str | None = None,
        iqa_weights_dir: str | None = None,
        lr: float = 5e-5,
        cond_lr_mult: float = 10.0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        bank_k: int = 3,
        bank_dir: str | None = None,
        bank_cache: int = 64,
        views: tuple[str, ...] = VIEWS,
        n_aug_variants: int = 2,
        aug_kinds: tuple[str, ...] = AUGMENTATIONS,
        aug_max_strength: float = 1.0,
        refresh_every: int = 1,
        train_on_variants: bool = True,
        level_rule: Literal["default", "quantile"] = "default",
        level_pool_size: int = 1024,
        strong_aug_p: float = 0.8,
        w_sup: float = 1.0,
        w_pl: float = 1.0,
        w_pref: float = 1.0,
        w_crop: float = 1.0,
        w_aux: float = 1.0,
        pref_start_step: int = 2000,
        crop_start_step: int = 2000,
        pref_mode: Literal["pair", "all_pairs"] = "pair",
        pref_levels_per_step: int | None = None,
        pref_beta: float = 1.0,
        pref_delta: float = 0.1,
        pref_lambda: float = 1.0,
        pref_lambda2: float = 0.5,
        low_levels: tuple[int, ...] = (4, 5, 6),
        top_level: int = 7,
        crop_fraction: float = 0.5,
        crop_windows: Literal["aligned", "independent"] = "aligned",
        mask_block: int = 144,
        seed: int = 0,
        mode: Literal["qualiteacher", "supervised", "mean_teacher"] = "qualiteacher",
        use_mask: bool = True,
        condition_on_level: bool = True,
        iqa_exclude: tuple[str, ...] = (),
        reward_detach: tuple[str, ...] = (),
        compile_student: bool = False,
        iqa_bf16: bool = False,
        ensemble: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["ensemble"])
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if pref_levels_per_step is not None and pref_levels_per_step < 3:
            raise ValueError(f"pref_levels_per_step must be >= 3 or None, got {pref_levels_per_step}")
        if not all(0 <= q < top_level for q in low_levels):
            raise ValueError(f"low_levels {low_levels} must lie in [0, top_level={top_level})")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        check_views(views)
        if mode not in ("qualiteacher", "supervised", "mean_teacher"):
            raise ValueError(f"mode must be qualiteacher, supervised or mean_teacher, got {mode!r}")
        self.student = build_student(student, preset, cond_mode, adain=adain, fidelity_w=fidelity_w)
        self.teacher = make_teacher(self.student)
        self.ensemble = ensemble  # built in setup() when not given
        self.bank = PseudoLabelBank(bank_k, DiskStore(bank_dir, bank_cache) if bank_dir else None)
        self.photometric = strong_photometric(strong_aug_p)
        self.strict_loading = False  # the frozen ensemble is left out of checkpoints
        self._gen = torch.Generator().manual_seed(seed)  # reseeded per rank in setup()
        self._resumed = False
        # running pool of candidate scores for the quantile level rule (saved with checkpoints)
        self.register_buffer("level_pool", torch.full((level_pool_size,), float("nan")))
        self.register_buffer("pool_ptr", torch.zeros((), dtype=torch.long))
        # steps skipped for a non-finite gradient (not saved: checkpoints keep their keys)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        if self.ensemble is None and self.hparams.mode != "supervised":  # supervised grades nothing
            from qualiteacher.iqa.presets import build_ensemble

            self.ensemble = build_ensemble(self.hparams.iqa_preset, task=self.hparams.task,
                                           weights_dir=self.hparams.iqa_weights_dir)
        if self.ensemble is not None and self.hparams.iqa_exclude:
            from qualiteacher.iqa.ensemble import without_members

            self.ensemble = without_members(self.ensemble, tuple(self.hparams.iqa_exclude))
        if self.ensemble is not None and self.hparams.reward_detach:
            from qualiteacher.iqa.ensemble import with_reward_modes

            self.ensemble = with_reward_modes(self.ensemble, detached_members(
                self.ensemble, tuple(self.hparams.reward_detach), self.hparams.iqa_preset))
        if self.ensemble is not None:
            self.ensemble.requires_grad_(False)
            if hasattr(self.ensemble, "low_precision"):
                self.ensemble.low_precision = self.hparams.iqa_bf16
        if stage == "fit" and self.hparams.init_from and self.global_step == 0:
            load_student_weights(self.student, self.hparams.init_from)
            self.teacher.load_state_dict(self.student.state_dict())
        if self.hparams.student == "iqpir":
            # encoder, transformer, conditioning and fusion blocks train; the codebook prior
            # (decoder + codebooks) stays as stage 1 learned it
            self.student.requires_grad_(True)
            freeze_prior_(self.student)
        if self.hparams.mode != "qualiteacher":
            # unconditioned modes never use the conditioning (and DDP needs every trainable weight used)
            set_conditioning_trainable_(self.student, False)
        if stage == "fit":
            # each rank its own draws (views, levels, crop windows, variants); restored on resume
            self._gen.manual_seed(rank_seed(self.hparams.seed, self.global_rank))
            ddp = self._trainer is not None and self.trainer.world_size > 1
            if ddp and not self.bank.store.durable and self.hparams.mode != "supervised":
                raise ValueError("stage 3 under DDP needs the disk bank: set model.bank_dir (the pipeline "
                                 "sets {out_dir}/stage3/bank); ranks share its entries through that folder")
        if self.hparams.compile_student and stage == "fit":
            # in place (weights and their names unchanged); static shapes: the number of targets per
            # step takes a few values, each compiled once (dynamic shapes hit an inductor error here)
            self.student.compile(dynamic=False)

    def train(self, mode: bool = True) -> "QualiTeacherModule":
        super().train(mode)
        self.teacher.eval()  # always: the teacher never trains and never uses dropout/batch stats
        if self.ensemble is not None:
            self.ensemble.eval()
        return self

    def configure_optimizers(self) -> Any:
        # the zero-initialised quality conditioning starts from nothing: it gets cond_lr_mult × lr
        cond = {id(p) for m in self.student.modules()
                if isinstance(m, (LevelEmbedding, AdaLNModulation)) for p in m.parameters()}
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in cond]},
                  {"params": [p for p in trainable if id(p) in cond],
                   "lr": self.hparams.lr * self.hparams.cond_lr_mult}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams.lr,
                                betas=self.hparams.betas, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return opt
        total = int(self.trainer.max_steps)
        if total <= 0:
            raise ValueError("lr_schedule 'cosine' decays over trainer.max_steps: set it (> 0)")
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # a non-finite gradient (a grader's feature at a degenerate output, an overflow) would turn
        # every weight into NaN for good: that step is skipped instead (no update, no weight decay)
        # and counted; the run goes on from the weights before it
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_steps += 1
            self.log("stage3/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        ema_update_(self.teacher, self.student, self.hparams.ema_decay)

    # ------------------------------------------------------------------ pseudo-labels
    def _masks(self, images: Tensor, fused: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if self.hparams.mask_block >= max(h, w):
            # one block covers the image: the mask is the image's own fused score
            return fused.view(-1, 1, 1, 1).expand(-1, 1, h, w)
        return self.ensemble.reliability_mask(images, block=self.hparams.mask_block)

    @torch.no_grad()
    def _update_level_rule(self, fused: Tensor) -> None:
        # quantile rule: levels spread evenly over a running pool of candidate scores
        n = fused.numel()
        idx = (self.pool_ptr + torch.arange(n, device=fused.device)) % self.level_pool.numel()
        self.level_pool[idx] = fused.float()
        self.pool_ptr.add_(n)
        pool = self.level_pool[torch.isfinite(self.level_pool)]
        if self.hparams.level_rule == "quantile" and pool.numel() >= 8:
            self.ensemble.fit_levels_(pool)

    @torch.no_grad()
    def refresh_pseudo_labels(self, x: Tensor, ids: list[str]) -> Refresh:
        """Teacher views + multi-augmented variants of ``x`` (B,3,H,W), graded in one call; the
        best enter the bank. Returns the variants (lower-quality targets) and log values."""
        hp = self.hparams
        b = x.shape[0]
        views = tuple(hp.views)
        stacked = torch.cat([apply_view(x, v) for v in views])                  # (V*B, 3, H, W)
        restored = self.teacher(stacked, None).image.float().clamp(0, 1)  # fp32 candidates under bf16 autocast
        cands = torch.cat([invert_view(restored[i * b:(i + 1) * b], v) for i, v in enumerate(views)])
        owner = torch.arange(b, device=x.device).repeat(len(views))
        n_variants = hp.n_aug_variants if hp.mode == "qualiteacher" else 0  # plain MT: views only
        if n_variants > 0:
            with torch.autocast(x.device.type, enabled=False):  # image processing in fp32 under bf16
                var = multi_augment(cands[:b], x.float(), n_variants, tuple(hp.aug_kinds),
                                    hp.aug_max_strength, generator=self._gen)
            cands = torch.cat([cands, var.images])
            owner = torch.cat([owner, var.source])
        fused = self.ensemble(cands).fused                                        # one batched call
        scorable = torch.isfinite(fused)  # a candidate the ensemble cannot judge (NaN) is left out, counted
        self._update_level_rule(fused)
        cand_ids = [ids[i] for i in owner.tolist()]
        keep = self.bank.accepts(cand_ids, fused).to(x.device)
        is_var = torch.arange(cands.shape[0], device=x.device) >= len(views) * b
        need = (keep | (is_var & hp.train_on_variants)) & scorable
        masks = torch.zeros_like(cands[:, :1]) if hp.use_mask else torch.ones_like(cands[:, :1])
        if hp.use_mask and need.any():
            masks[need] = self._masks(cands[need], fused[need])
        levels = self.ensemble.level_of(fused)
        kept = 0
        if keep.any():
            sel = keep.nonzero(as_tuple=True)[0]
            kept = self.bank.offer_batch([cand_ids[i] for i in sel.tolist()], cands[sel], masks[sel],
                                         fused[sel], levels[sel])
        logs = {"cand_score": float(fused[scorable].mean()) if scorable.any() else float("nan"),
                "cand_kept": float(kept), "cand_unscorable": float((~scorable).sum())}
        v = (is_var & scorable) if hp.train_on_variants else torch.zeros_like(is_var)
        return Refresh(cands[v], masks[v], fused[v], owner[v], logs)

    # ------------------------------------------------------------------ losses
    def _reward(self, images: Tensor) -> Tensor:
        return self.ensemble.reward(images)

    def _geometric(self, *xs: Tensor) -> tuple[Tensor, ...]:
        # one random view for the batch, applied to the input and its pseudo-labels alike
        v = VIEWS[int(torch.randint(len(VIEWS), (1,), generator=self._gen))]
        return tuple(apply_view(t, v) for t in xs)

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> Tensor:
        hp = self.hparams
        if hp.mode == "supervised":
            return self._supervised_step(batch["labeled"])
        conditioned = hp.mode == "qualiteacher"
        step = self.global_step
        lab, unl = batch["labeled"], batch["unlabeled"]
        x_u, ids = unl["lq"], list(unl["id"])
        logs: dict[str, float] = {}

        # pseudo-labels: the teacher restores the real images; the ensemble grades; the bank keeps the best
        fresh = None
        if step % hp.refresh_every == 0 or not all(i in self.bank for i in ids):
            fresh = self.refresh_pseudo_labels(x_u, ids)
            logs.update(fresh.logs)

        # supervised part: paired synthetic data, unconditioned
        sup = self.student(lab["lq"], None)
        l_sup = F.l1_loss(sup.image, lab["gt"])
        l_aux = sup.aux_loss

        # pseudo-label part: the strong view of x at each bank entry's own level
        # pseudo-label part: bank entries (the best k) plus this step's degraded variants, each
        # at the level its own score gives under the current level rule
        pls, masks, _, pl_scores, owner = self.bank.gather(ids, device=x_u.device)
        if owner.numel() == 0:
            raise RuntimeError("the pseudo-label bank holds nothing for this batch: the ensemble "
                               "returned no finite score for any candidate")
        best_pls, best_scores, best_owner = pls, pl_scores, owner
        if fresh is not None and fresh.owner.numel():
            pls, masks = torch.cat([pls, fresh.variants]), torch.cat([masks, fresh.masks])
            pl_scores, owner = torch.cat([pl_scores, fresh.scores]), torch.cat([owner, fresh.owner])
        levels = self.ensemble.level_of(pl_scores)
        x_u, pls, masks = self._geometric(x_u, pls, masks)
        x_s = self.photometric(x_u).clamp(0, 1)
        b = x_s.shape[0]
        use_pref = conditioned and hp.w_pref > 0 and step >= hp.pref_start_step
        use_crop = conditioned and hp.w_crop > 0 and step >= hp.crop_start_step
        # conditions of one image go through one student forward: PL levels (+ top and lower level)
        inputs, conds = [x_s[owner]], [levels]
        if use_pref:
            if hp.pref_mode == "pair":
                pref_levels = torch.stack([torch.full((b,), hp.top_level, device=x_s.device),
                                           draw_low_levels(b, tuple(hp.low_levels), self._gen, x_s.device)])
            else:
                grid = torch.tensor(sorted(set(hp.low_levels) | {hp.top_level}), device=x_s.device)
                pref_levels = grid[:, None].expand(-1, b)                         # (L, B)
                if hp.pref_levels_per_step is not None and hp.pref_levels_per_step < grid.numel():
                    # a random subset per image, top level always in (sorted last: reused below)
                    pref_levels = draw_level_subsets(b, grid, hp.pref_levels_per_step, hp.top_level,
                                                     self._gen).T                  # (m, B)
            inputs += [x_s] * pref_levels.shape[0]
            conds += list(pref_levels)
        cond = torch.cat(conds)
        if not hp.condition_on_level:  # "-conditioning": the student only ever sees the top level
            cond = torch.full_like(cond, hp.top_level)
        out = self.student(torch.cat(inputs), cond if conditioned else None)
        n_pl = owner.numel()
        l_pl = pseudo_label_loss(out.image[:n_pl], pls, masks, owner, b)
        l_aux = l_aux + out.aux_loss

        l_pref = l_pref_a = l_pref_b = x_s.new_zeros(())
        top = None
        if use_pref:
            outs = out.image[n_pl:].view(-1, b, *x_s.shape[1:])                  # (L, B, 3, H, W)
            rewards = self._reward(outs.flatten(0, 1)).view(-1, b)              # (L, B)
            if hp.pref_mode == "pair":
                # max_k r(PL_k) on the reward's scale (teacher side, no gradients)
                r_pl_best = self._best_pl_reward(best_pls, best_scores, best_owner, b)
                pl = preference_loss(rewards[0], rewards[1], r_pl_best, hp.pref_beta, hp.pref_delta,
                                     hp.pref_lambda, hp.pref_lambda2)
                l_pref, l_pref_a, l_pref_b = pl
            else:
                # margin grows with the level gap; the widest gap (top vs lowest) gets δ
                per_level = hp.pref_delta / max(1, hp.top_level - min(hp.low_levels))
                n_grid = len(set(hp.low_levels) | {hp.top_level})
                if pref_levels.shape[0] < n_grid:
                    l_pref = hp.pref_lambda * sampled_all_pairs_preference_loss(
                        rewards.T, pref_levels.T, n_grid, hp.top_level, hp.pref_beta, per_level)
                else:
                    l_pref = hp.pref_lambda * all_pairs_preference_loss(rewards.T, pref_levels[:, 0],
                                                                        hp.pref_beta, per_level)
            top = outs[-1] if hp.pref_mode == "all_pairs" else outs[0]

        l_crop = x_s.new_zeros(())
        if use_crop:
            l_crop = self._crop_consistency(x_s, top)

        total = (hp.w_sup * l_sup + hp.w_pl * l_pl + hp.w_pref * l_pref + hp.w_crop * l_crop
                 + hp.w_aux * l_aux)
        self.log_dict({
            "stage3/total": total, "stage3/sup": l_sup, "stage3/pl": l_pl, "stage3/pref": l_pref,
            "stage3/pref_a": l_pref_a, "stage3/pref_b": l_pref_b, "stage3/crop": l_crop,
            "stage3/aux": l_aux, "stage3/bank_mean_score": self.bank.mean_score(),
            "stage3/bank_images": float(len(self.bank)), **{f"stage3/{k}": v for k, v in logs.items()},
            **{f"stage3/pl_level_{q}": float(c) for q, c in enumerate(self._bank_level_histogram())},
        }, prog_bar=False, on_step=True, on_epoch=False, batch_size=b)
        self.log("loss", total, prog_bar=True, on_step=True, batch_size=b, logger=False)
        return total

    def _supervised_step(self, lab: dict[str, Any]) -> Tensor:
        # the "supervised" baseline: L_sup on the paired data, nothing else
        sup = self.student(lab["lq"], None)
        l_sup = F.l1_loss(sup.image, lab["gt"])
        total = self.hparams.w_sup * l_sup + self.hparams.w_aux * sup.aux_loss
        b = lab["lq"].shape[0]
        self.log_dict({"stage3/total": total, "stage3/sup": l_sup, "stage3/aux": sup.aux_loss},
                      prog_bar=False, on_step=True, on_epoch=False, batch_size=b)
        self.log("loss", total, prog_bar=True, on_step=True, batch_size=b, logger=False)
        return total

    def _bank_level_histogram(self) -> list[int]:
        # levels under the current rule (the quantile thresholds move as the pool fills)
        levels = self.ensemble.level_of(self.bank.scores().to(self.level_pool.device))
        return torch.bincount(levels, minlength=self.hparams.top_level + 1).tolist()

    @torch.no_grad()
    def _best_pl_reward(self, pls: Tensor, scores: Tensor, owner: Tensor, b: int) -> Tensor:
        """``max_k r(PL_k)`` per image (B,) on the scale of ``ensemble.reward``: the fused scores the
        bank recorded when the reward is the fused score (no member ``exclude``d), else the reward of
        the bank's pseudo-labels themselves (geometric views leave it unchanged up to borders)."""
        if not self.ensemble.reward_is_fused:
            scores = self._reward(pls)
        return torch.full((b,), -1e4, device=pls.device).scatter_reduce(0, owner, scores.float(), reduce="amax")

    def _crop_consistency(self, x_s: Tensor, top: Tensor | None) -> Tensor:
        hp = self.hparams
        h, w = x_s.shape[-2:]
        mult = self.student.size_multiple  # windows the student runs on without padding
        win_out = random_window(h, w, hp.crop_fraction, mult, self._gen)
        win_in = win_out if hp.crop_windows == "aligned" else random_window(h, w, hp.crop_fraction, mult, self._gen)
        b = x_s.shape[0]
        top_level = torch.full((b,), hp.top_level, device=x_s.device)
        if top is None:
            top = self.student(x_s, top_level).image
        of_crop = self.student(win_in(x_s), top_level).image
        return crop_consistency_loss(self._reward(win_out(top)), self._reward(of_crop))

    # ------------------------------------------------------------------ checkpoints
    def on_train_start(self) -> None:
        if self._resumed and self.bank.store.durable:
            # entries a killed run wrote after its last checkpoint: no index refers to them
            if self.global_rank == 0:
                self.bank.store.delete(sorted(self.bank.store.keys_on_disk() - self.bank.live_keys()))
            self.trainer.strategy.barrier("pseudo-label bank sweep")  # before any rank writes again

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the checkpoint marked in on_save_checkpoint is on disk now: drop what it no longer needs
        self.bank.collect_garbage()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith(_FROZEN_PREFIXES)]:
            del sd[k]
        # Lightning builds the checkpoint on every rank (rank 0 writes it): gather the ranks'
        # indexes (no pixels: the entries are files in the shared bank folder) and random states
        mine = {"index": self.bank.index_state(), "generator": self._gen.get_state(),
                "torch": torch.get_rng_state()}
        ranks = all_gather_objects(mine)
        if len(ranks) > 1:  # every rank continues from the merged index
            self.bank.load_index_(merge_indexes([r["index"] for r in ranks], self.bank.k))
        checkpoint["pseudo_label_bank"] = self.bank.state_dict()
        checkpoint["qualiteacher_rng"] = {"generator": [r["generator"] for r in ranks],
                                          "torch": [r["torch"] for r in ranks]}
        self.bank.mark_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = {k for k in self.state_dict() if not k.startswith(_FROZEN_PREFIXES)}
        missing = sorted(own - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} weights of this model, e.g. {missing[:5]}")
        if "pseudo_label_bank" in checkpoint:
            self.bank.load_state_dict(checkpoint["pseudo_label_bank"])
            lost = self.bank.missing_entries()
            if lost:
                raise RuntimeError(f"{len(lost)} pseudo-label bank entries of this checkpoint are missing from "
                                   f"bank_dir={self.hparams.bank_dir!r} (e.g. {lost[0]}): was the folder moved "
                                   f"or deleted? Point model.bank_dir at it.")
            self._resumed = True
        rng = checkpoint.get("qualiteacher_rng")
        if rng is not None and self.global_rank < len(rng["generator"]):
            self._gen.set_state(rng["generator"][self.global_rank])
            torch.set_rng_state(rng["torch"][self.global_rank])
        elif rng is not None:  # more ranks than the run that saved it: fresh streams for the new ones
            self._gen.manual_seed(rank_seed(self.hparams.seed + checkpoint.get("global_step", 0), self.global_rank))
        pool = checkpoint["state_dict"].get("level_pool")
        if self.hparams.level_rule == "quantile" and self.ensemble is not None and pool is not None:
            finite = pool[torch.isfinite(pool)]
            if finite.numel() >= 8:
                self.ensemble.fit_levels_(finite.to(self.level_pool.device))


def load_trained(path: str | Path) -> QualiTeacherModule:
    """A trained stage-3 module (student, teacher, bank) from its checkpoint, on the CPU, in eval
    mode; the IQA ensemble is not rebuilt (build one with ``build_ensemble`` to score outputs).

    The file is read with ``weights_only=True`` (never unpickled as code) and checked strictly:
    every student / teacher weight must be there (``torch.compile`` keys are accepted), nothing
    else may be; problems raise ``CheckpointError`` naming the file and the problem."""
    import inspect

    from qualiteacher.checkpoints import CheckpointError, check_keys, checkpoint_state, describe, read_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stage 3 checkpoint not found: {path} (run stage3 first)")
    ckpt = read_checkpoint(path)
    state = checkpoint_state(ckpt, path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or not any(k.startswith("teacher.") for k in state):
        raise CheckpointError(path, f"not a stage-3 checkpoint: it looks like {describe(state)}; "
                                    f"pass OUT/stage3/final.ckpt")
    known = set(inspect.signature(QualiTeacherModule.__init__).parameters) - {"self", "ensemble"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise CheckpointError(path, f"hyper-parameters unknown to this version of QualiTeacherModule: {unknown}")
    try:
        module = QualiTeacherModule(**{k: v for k, v in hparams.items() if k != "init_from"}, ensemble=nn.Identity())
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"its hyper-parameters do not build a model: {err}") from None
    check_keys(path, state, module.state_dict(), "stage-3 model", ignore=_FROZEN_PREFIXES)
    try:
        module.load_state_dict({k: v for k, v in state.items() if not k.startswith(_FROZEN_PREFIXES)}, strict=True)
    except RuntimeError as err:  # shapes differ: another preset or architecture
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err)[:200])
        raise CheckpointError(path, f"weights do not fit the model its hyper-parameters build: {first}") from None
    bank = ckpt.get("pseudo_label_bank", {"k": module.bank.k, "entries": {}})
    try:
        module.bank.load_state_dict(bank)
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise CheckpointError(path, f"pseudo-label bank is malformed ({type(err).__name__}: {err})") from None
    return module.eval()

