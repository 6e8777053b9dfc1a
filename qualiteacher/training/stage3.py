"""Stage 3: QualiTeacher — Mean Teacher with quality-conditioned pseudo-labels (METHOD.md §3–4).

``training_step`` reads like the method: refresh the pseudo-labels, then the supervised, pseudo-label,
preference and consistency parts; the baselines have steps of their own. This module is glue: the
pieces are in ``stage3_steps`` / ``stage3_grading``, the maths in ``losses`` and ``teacher``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from qualiteacher.archs.context import fixed_prior_statistics, prior_statistics, select_statistics
from qualiteacher.archs.iqpir import freeze_prior_
from qualiteacher.losses.consistency import crop_consistency_loss, crop_windows
from qualiteacher.losses.preference import PreferenceLoss, RankedLevels, draw_ranked_levels, preference_term
from qualiteacher.losses.pseudo import pseudo_label_loss
from qualiteacher.checkpoints import CheckpointError
from qualiteacher.teacher.bank import PseudoLabelBank
from qualiteacher.teacher.bank_store import DiskStore
from qualiteacher.teacher.ema import ema_update_, make_teacher
from qualiteacher.teacher.multiaug import AUGMENTATIONS
from qualiteacher.teacher.views import VIEWS
from qualiteacher.training.distributed import rank_seed, set_conditioning_trainable_
from qualiteacher.training.stage3_checkpoint import (
    FROZEN_PREFIXES, drop_frozen_, load_trained_state_, read_trained, restore_bank_and_streams,
    save_bank_and_streams_,
)
from qualiteacher.training.stage3_grading import (
    Refresh, record_scores_, refresh_pseudo_labels, reliability_masks, training_ensemble,
)
from qualiteacher.training.stage3_settings import Stage3Settings
from qualiteacher.training.stage3_steps import (
    BestPseudoLabels, PseudoLabelBatch, StudentOutputs, Terms, best_pl_reward, build_optimizer, conditioned_outputs,
    drop_non_finite_grads_, no_preference, pseudo_label_batch, relative_levels, strong_photometric, supervised_loss,
    weighted_total,
)
from qualiteacher.training.students import build_student, load_student_weights


class QualiTeacherModule(L.LightningModule):
    """Quality-conditioned Mean-Teacher training on paired synthetic + unlabeled real batches.

    The arguments are flat: the keys users write (``stage3.model.<name>``), checkpoints' hyper-parameters,
    MLflow's parameters. ``__init__`` turns them into typed groups at once, ``self.settings``
    (``stage3_settings.Stage3Settings``; ``FLAT_KEYS`` says where each goes), and reads only those.

    Args:
        student: ``iqpir`` (codebook student) or ``unet`` (plug-in conditioned U-Net).
        preset: architecture preset (``tiny``, ``base``, ``paper``).
        cond_mode: quality conditioning of the IQPIR transformer, ``add`` or ``adaln``.
        init_from: checkpoint of the warmed-up student (the fidelity stage for IQPIR, the warm-up
            for the U-Net); loaded in ``setup``.
        fidelity_w: IQPIR's fidelity weight ``w`` the student trains and runs at (its default at
            inference); adain: AdaIN colour re-normalisation of the quantised latent;
            fusion_prior: the classical restorer (``dcp``, ``lime`` ...) the image-level fusion
            reads beside the LQ image (must match the warm-up's ``fusion_prior``).
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
            ``w_sup_top`` (0 = METHOD.md) adds the paired data at the top level, ``L1(S(x_l, top),
            y)``: ``L_sup`` and its clean -> clean pairs reach the unconditioned path only.
        pref_mode: ``pair`` (METHOD.md L_a + λ₂ L_b) or ``all_pairs`` (every ordered level pair).
        pref_levels_per_step: ``all_pairs`` only: rank a random subset of this many levels per image
            and step (the top level always in), with an unbiased estimate of the all-pairs loss;
            None ranks every level.
        crop_windows: ``aligned`` (same window for both sides) or ``independent`` (as released).
        mask_block: block size of the per-pixel reliability mask.
        refresh_every: grade new candidates every n steps (and whenever an image is new to the bank).
        train_on_variants: the step's multi-augmented variants are PL targets too (at their own,
            lower levels) besides the bank's best k: the student sees the whole quality range.
        level_rule: ``default`` (METHOD.md: 8 levels from the fused score), ``quantile``
            (levels spread evenly over a running pool of the last ``level_pool_size`` candidate scores),
            ``relative`` (each target's level by its drop below the best candidate of its own
            image, spread evenly over the batch: ``stage3_steps.relative_levels``) or ``relative_drop``
            (the same drop, the level falling in proportion to it).
        mode: ``qualiteacher`` (the method); ``supervised`` (L_sup alone on the paired data: the
            unlabeled batch, the teacher's pseudo-labels, the bank and the ensemble are never used);
            ``mean_teacher`` (plain Mean Teacher: EMA teacher, views, best-k bank, masked L1 to the
            bank's pseudo-labels, student unconditioned; multi-augmentation, preference and
            consistency are off whatever their settings). ``study.modes`` names the variants; its
            ``oracle`` is ``supervised`` on the unlabeled photos' own pairs.
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
        ensemble: the IQA ensemble (tests, benchmarks); None builds it in ``setup`` from the
            ``iqa_*`` settings. Frozen, never checkpointed.
    """

    # one flat argument per setting (see the class docstring): a long signature, a short body
    def __init__(  # noqa: PLR0913
        self,
        student: Literal["iqpir", "unet"] = "iqpir",
        preset: str = "tiny",
        cond_mode: Literal["add", "adaln"] = "add",
        init_from: str | None = None,
        fidelity_w: float = 1.0,
        adain: bool = False,
        fusion_prior: str | None = None,
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
        level_rule: Literal["default", "quantile", "relative", "relative_drop"] = "default",
        level_pool_size: int = 1024,
        strong_aug_p: float = 0.8,
        strong_aug_target: bool = False,
        w_sup: float = 1.0,
        w_pl: float = 1.0,
        w_pref: float = 1.0,
        w_crop: float = 1.0,
        w_aux: float = 1.0,
        w_sup_top: float = 0.0,
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
        self.settings = s = Stage3Settings.from_flat(self.hparams)  # validates every value
        self.student = build_student(s.student.kind, s.student.preset, s.student.cond_mode,
                                     adain=s.student.adain, fidelity_w=s.student.fidelity_w,
                                     fusion_prior=s.student.prior)
        self.teacher = make_teacher(self.student)
        self.ensemble = ensemble  # built in setup() when not given
        store = DiskStore(s.teacher.bank_dir, s.teacher.bank_cache) if s.teacher.bank_dir else None
        self.bank = PseudoLabelBank(s.teacher.bank_k, store)
        self.photometric = strong_photometric(s.student.strong_aug_p)
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
        s = self.settings
        if self.ensemble is not None or s.mode != "supervised":  # supervised grades nothing: none is built
            self.ensemble = training_ensemble(self.ensemble, s.grading)
        if stage == "fit" and s.student.init_from and self.global_step == 0:
            load_student_weights(self.student, s.student.init_from)
            self.teacher.load_state_dict(self.student.state_dict())
        if s.student.kind == "iqpir":
            # encoder, transformer, conditioning and fusion blocks train; the codebook prior
            # (decoder + codebooks) stays as stage 1 learned it
            self.student.requires_grad_(True)
            freeze_prior_(self.student)
        if s.mode != "qualiteacher":
            # unconditioned modes never use the conditioning (and DDP needs every trainable weight used)
            set_conditioning_trainable_(self.student, False)
        if stage == "fit":
            # each rank its own draws (views, levels, crop windows, variants); restored on resume
            self._gen.manual_seed(rank_seed(s.seed, self.global_rank))
            ddp = self._trainer is not None and self.trainer.world_size > 1
            if ddp and not self.bank.store.durable and s.mode != "supervised":
                raise ValueError("stage 3 under DDP needs the disk bank: set model.bank_dir (the pipeline "
                                 "sets {out_dir}/stage3/bank); ranks share its entries through that folder")
        if s.student.compile and stage == "fit":
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
        return build_optimizer(self.student, self.settings.optim, int(self.trainer.max_steps))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # a non-finite gradient would turn every weight into NaN for good: that step is skipped
        # (no update, no weight decay) and counted; the run goes on from the weights before it
        if drop_non_finite_grads_(optimizer):
            self.skipped_steps += 1
            self.log("stage3/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        ema_update_(self.teacher, self.student, self.settings.teacher.ema_decay)

    # ------------------------------------------------------------------ the steps
    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> Tensor:
        s, step = self.settings, self.global_step
        if s.mode == "supervised":  # the baselines have steps of their own (the study's oracle is this one)
            return self.supervised_step(batch)
        if s.mode == "mean_teacher":
            return self.mean_teacher_step(batch)
        fresh = self._refresh_if_due(batch["unlabeled"])   # teacher -> graded candidates -> bank (best k)
        labeled_stats = self._statistics(batch["labeled"])
        l_sup, aux = supervised_loss(self.student, batch["labeled"], labeled_stats)  # L_sup
        l_sup_top = supervised_loss(self.student, batch["labeled"], labeled_stats, level=s.top_level)[0] \
            if s.weights.sup_top > 0 else None  # L_sup_top
        pl = self._pseudo_label_batch(batch["unlabeled"], fresh)   # targets and their levels, input x_s
        ranked = self._ranked_levels(pl.x_s) if s.preference_on(step) else None  # the levels L_pref ranks
        out = conditioned_outputs(self.student, pl, ranked, s.top_level, s.condition_on_level)  # one forward
        l_pl = pseudo_label_loss(out.pl, pl.targets, pl.masks, pl.owner, pl.size)
        pref = self._preference(out, ranked, pl) if ranked is not None else no_preference(pl.x_s)
        l_crop = self._crop_consistency(pl.x_s, out.top, pl.stats) if s.consistency_on(step) else pl.x_s.new_zeros(())
        terms = Terms(l_sup, l_pl, pref, l_crop, aux + out.aux, l_sup_top)
        return self._log_step(terms, fresh, pl.size, pl.levels)

    def mean_teacher_step(self, batch: dict[str, dict[str, Any]]) -> Tensor:
        """Plain Mean Teacher: the bank's pseudo-labels (views only), the student unconditioned."""
        unlabeled = batch["unlabeled"]
        fresh = self._refresh_if_due(unlabeled)
        l_sup, aux = supervised_loss(self.student, batch["labeled"], self._statistics(batch["labeled"]))
        pl = self._pseudo_label_batch(unlabeled, fresh)
        with fixed_prior_statistics(self.student, select_statistics(pl.stats, pl.owner)):
            out = self.student(pl.x_s[pl.owner], None)                             # unconditioned
        l_pl = pseudo_label_loss(out.image, pl.targets, pl.masks, pl.owner, pl.size)
        zero = pl.x_s.new_zeros(())
        return self._log_step(Terms(l_sup, l_pl, no_preference(zero), zero, aux + out.aux_loss), fresh, pl.size)

    def supervised_step(self, batch: dict[str, dict[str, Any]]) -> Tensor:
        """``L_sup`` on the paired data, nothing else (the unlabeled batch is never read)."""
        labeled = batch["labeled"]
        l_sup, aux = supervised_loss(self.student, labeled, self._statistics(labeled))
        total = self.settings.weights.sup * l_sup + self.settings.weights.aux * aux
        return self._log({"stage3/total": total, "stage3/sup": l_sup, "stage3/aux": aux}, labeled["lq"].shape[0])

    def _log_step(self, t: Terms, fresh: Refresh | None, b: int, levels: Tensor | None = None) -> Tensor:
        logs = dict(fresh.logs) if fresh is not None else {}
        if levels is not None:  # the levels this step's targets were trained at (the bank's are below)
            hist = torch.bincount(levels[levels >= 0], minlength=self.settings.top_level + 1)
            logs.update({f"target_level_{q}": float(c) for q, c in enumerate(hist.tolist())})
        return self._log({
            "stage3/total": weighted_total(self.settings.weights, t), "stage3/sup": t.sup, "stage3/pl": t.pl,
            "stage3/pref": t.pref.total, "stage3/pref_a": t.pref.l_a, "stage3/pref_b": t.pref.l_b,
            "stage3/crop": t.crop, "stage3/aux": t.aux, "stage3/bank_mean_score": self.bank.mean_score(),
            **({} if t.sup_top is None else {"stage3/sup_top": t.sup_top}),
            "stage3/bank_images": float(len(self.bank)), **{f"stage3/{k}": v for k, v in logs.items()},
            **{f"stage3/pl_level_{q}": float(c) for q, c in enumerate(self._bank_level_histogram())},
        }, b)

    def _log(self, metrics: dict[str, Any], b: int) -> Tensor:
        self.log_dict(metrics, prog_bar=False, on_step=True, on_epoch=False, batch_size=b)
        self.log("loss", metrics["stage3/total"], prog_bar=True, on_step=True, batch_size=b, logger=False)
        return metrics["stage3/total"]

    # ------------------------------------------------------------------ pseudo-labels
    @torch.no_grad()
    def refresh_pseudo_labels(self, x: Tensor, ids: list[str]) -> Refresh:
        """Teacher views + multi-augmented variants of ``x`` (B,3,H,W), graded in one call; the
        best enter the bank. Returns the variants (lower-quality targets) and log values."""
        return refresh_pseudo_labels(self.teacher, self.ensemble, self.bank, x, ids, self.settings.teacher,
                                     self.settings.grading.use_mask, self._gen, self._masks, self._update_level_rule)

    def _refresh_if_due(self, unlabeled: dict[str, Any]) -> Refresh | None:
        ids = list(unlabeled["id"])
        if self.global_step % self.settings.teacher.refresh_every == 0 or not all(i in self.bank for i in ids):
            with fixed_prior_statistics(self.teacher, self._statistics(unlabeled)):  # the teacher's views: V x B
                return self.refresh_pseudo_labels(unlabeled["lq"], ids)
        return None

    def _statistics(self, part: dict[str, Any]) -> dict[str, Tensor] | None:
        # the fusion prior's statistics of the whole images of a batch part (its "context"), or None
        return prior_statistics(self.student, part.get("context"))

    def _masks(self, images: Tensor, fused: Tensor) -> Tensor:
        return reliability_masks(self.ensemble, images, fused, self.settings.grading.mask_block)

    @torch.no_grad()
    def _update_level_rule(self, fused: Tensor) -> None:
        # quantile rule: levels spread evenly over a running pool of candidate scores
        pool = record_scores_(self.level_pool, self.pool_ptr, fused)
        if self.settings.grading.level_rule == "quantile" and pool.numel() >= 8:
            self.ensemble.fit_levels_(pool)

    def _target_levels(self, scores: Tensor, owner: Tensor) -> Tensor:
        # the level rule: the relative rules look at each target's own image (owner), the others at its score alone
        rule = self.settings.grading.level_rule
        if rule in ("relative", "relative_drop"):
            return relative_levels(scores, owner, self.settings.top_level, "drop" if rule == "relative_drop" else "rank")
        return self.ensemble.level_of(scores)

    def _pseudo_label_batch(self, unlabeled: dict[str, Any], fresh: Refresh | None) -> PseudoLabelBatch:
        return pseudo_label_batch(self.bank, unlabeled, fresh, self._target_levels, self.photometric, self._gen,
                                  partial(prior_statistics, self.student), self.settings.student.strong_aug_target)

    def _bank_level_histogram(self) -> list[int]:
        # levels under the current rule (the quantile thresholds move as the pool fills)
        levels = self.ensemble.level_of(self.bank.scores().to(self.level_pool.device))
        return torch.bincount(levels, minlength=self.settings.top_level + 1).tolist()

    # ------------------------------------------------------------------ preference and consistency
    def _reward(self, images: Tensor) -> Tensor:
        return self.ensemble.reward(images)

    def _ranked_levels(self, x_s: Tensor) -> RankedLevels:
        return draw_ranked_levels(self.settings.preference, x_s.shape[0], self._gen, x_s.device)

    def _preference(self, out: StudentOutputs, ranked: RankedLevels, pl: PseudoLabelBatch) -> PreferenceLoss:
        rewards = self._reward(out.ranked.flatten(0, 1)).view(-1, pl.size)              # (m, B)
        r_pl_best = (self._best_pl_reward(*pl.best, pl.size)  # max_k r(PL_k) on the reward's scale (L_b)
                     if self.settings.preference.uses_best_pseudo_label else None)
        return preference_term(self.settings.preference, rewards, ranked.levels, r_pl_best)

    def _best_pl_reward(self, pls: Tensor, scores: Tensor, owner: Tensor, b: int) -> Tensor:
        return best_pl_reward(self._reward, self.ensemble.reward_is_fused, BestPseudoLabels(pls, scores, owner), b)

    def _crop_consistency(self, x_s: Tensor, top: Tensor | None, stats: dict[str, Tensor] | None = None) -> Tensor:
        # top: S(x_s, top level) when the preference part computed it, else computed here
        mult = self.student.size_multiple  # windows the student runs on without padding
        win_out, win_in = crop_windows(self.settings.consistency, *x_s.shape[-2:], mult, self._gen)
        top_level = torch.full((x_s.shape[0],), self.settings.top_level, device=x_s.device)
        with fixed_prior_statistics(self.student, stats):  # a window is part of the same image
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
        drop_frozen_(checkpoint["state_dict"])
        save_bank_and_streams_(checkpoint, self.bank, self._gen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = {k for k in self.state_dict() if not k.startswith(FROZEN_PREFIXES)}
        missing = sorted(own - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} weights of this model, e.g. {missing[:5]}")
        s = self.settings
        if restore_bank_and_streams(checkpoint, self.bank, self._gen, self.global_rank, s.seed, s.teacher.bank_dir):
            self._resumed = True
        pool = checkpoint["state_dict"].get("level_pool")
        if s.grading.level_rule == "quantile" and self.ensemble is not None and pool is not None:
            finite = pool[torch.isfinite(pool)]
            if finite.numel() >= 8:
                self.ensemble.fit_levels_(finite.to(self.level_pool.device))


def load_trained(path: str | Path) -> QualiTeacherModule:
    """A trained stage-3 module (student, teacher, bank) from its checkpoint, on the CPU, in eval
    mode; the IQA ensemble is not rebuilt (build one with ``build_ensemble`` to score outputs).

    The file is read with ``weights_only=True`` (never unpickled as code) and checked strictly:
    every student / teacher weight must be there (``torch.compile`` keys are accepted), nothing
    else may be; problems raise ``CheckpointError`` naming the file and the problem. Its
    hyper-parameters are the constructor's flat arguments, as in every stage-3 checkpoint."""
    path = Path(path)
    ckpt, state, hparams = read_trained(path, QualiTeacherModule.__init__)
    try:
        module = QualiTeacherModule(**{k: v for k, v in hparams.items() if k != "init_from"}, ensemble=nn.Identity())
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(path, f"its hyper-parameters do not build a model: {err}") from None
    load_trained_state_(path, module, module.bank, ckpt, state)
    return module.eval()
