"""Reward-hacking guard for stage 3: watch what the reward cannot see while the student learns it.

Every ``every_n_steps`` the student restores a fixed probe batch at the top level (a few unlabeled
images and labeled pairs, taken once from the first training batch, or from the validation set
when there is one); the ensemble scores the outputs. The fused score, every member's normalised
score and the full-reference PSNR on the labeled pairs are logged. When the fused score rises
while a *witness* falls, probe after probe, for ``patience`` consecutive probes, the guard warns
once: the student is learning something the ensemble pays for and the other measures call worse.
Witnesses are the members the reward's gradient cannot follow (``reward_mode`` ``detach`` or
``exclude``; PIQE in the offline preset), the PSNR and two colour measures
(:func:`colour_correlation`: the output's opponent chroma against the ground truth's on the labeled
pairs, ``colour``, and against the input's on the unlabeled images, ``colour_input``): a student
that throws colour away, tints it or paints chroma speckle lowers them. A last witness,
``psnr_clean``, gives the student the probe pairs' *ground truth* and measures what comes back
against it (do no harm): the graders pay for a student's rework of a clean photo (`docs/iqa.md`),
so a reward that climbs while clean photos come back more changed is the same hacking seen from
the other side. The decision is the pure function :func:`hacking_alarm`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from qualiteacher.iqa.bounded import score_bounded
from qualiteacher.say import say
from qualiteacher.training.restore import restore

PSNR = "psnr"
COLOUR = "colour"
COLOUR_INPUT = "colour_input"
CLEAN = "psnr_clean"


class Probe(NamedTuple):
    step: int
    fused: float
    measures: dict[str, float]  # witness name -> value, higher = better


def hacking_alarm(history: Sequence[Probe], patience: int = 3, tol: float = 1e-4) -> str | None:
    """A message when, over the last ``patience`` probe-to-probe changes, the fused score rose every
    time by more than ``tol`` while one witness fell every time by more than ``tol``; else None."""
    if len(history) <= patience:
        return None
    last = history[-(patience + 1):]
    if not all(b.fused - a.fused > tol for a, b in zip(last, last[1:])):
        return None
    falling = [name for name in last[-1].measures
               if all(name in p.measures and math.isfinite(p.measures[name]) for p in last)
               and all(a.measures[name] - b.measures[name] > tol for a, b in zip(last, last[1:]))]
    if not falling:
        return None
    first, now = last[0], last[-1]
    parts = ", ".join(f"{n} {first.measures[n]:.3f} -> {now.measures[n]:.3f}" for n in falling)
    # the other witnesses' movement over the same probes, so the reader can weigh the verdict
    others = [f"{n} {first.measures[n]:.3f} -> {now.measures[n]:.3f}" for n in now.measures
              if n not in falling and n in first.measures
              and math.isfinite(first.measures[n]) and math.isfinite(now.measures[n])]
    context = f" (the other witnesses over the same probes: {', '.join(others)})" if others else ""
    return (f"REWARD HACKING? Over the last {patience} probes (steps {first.step}-{now.step}) the fused "
            f"IQA score rose {first.fused:.3f} -> {now.fused:.3f} while {parts} fell every time{context}: "
            f"the student may be learning what the ensemble pays for and the other measures call worse. "
            f"Look at the stage-3 grids, audit the ensemble (`qualiteacher iqa audit`) and consider stopping.")


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Mean PSNR (dB) over a batch of images in [0, 1]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean()


def colour_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Mean Pearson correlation over a batch (B, 3, H, W) of the opponent chroma channels
    (``R - G``, ``(R + G) / 2 - B``) of ``x`` and ``y``, pixel by pixel: 1 = the same colours up
    to scale, 0 = unrelated; a channel without variation counts 0."""
    def opp(z: Tensor) -> Tensor:
        r, g, b = z.float().unbind(1)
        c = torch.stack([r - g, 0.5 * (r + g) - b], 1).flatten(2)  # (B, 2, HW)
        return c - c.mean(2, keepdim=True)

    a, b = opp(x), opp(y)
    cov = (a * b).mean(2)
    scale = (a.pow(2).mean(2) * b.pow(2).mean(2)).sqrt()
    return torch.where(scale > 1e-10, cov / scale.clamp_min(1e-10), torch.zeros_like(cov)).mean()


class RewardGuard(L.Callback):
    """Logs ``reward_guard/*`` (fused, members, psnr, colour, psnr_clean) on a fixed probe batch every ``every_n_steps``
    and warns once through :func:`hacking_alarm` (see the module doc)."""

    def __init__(self, every_n_steps: int = 50, patience: int = 3, n_unlabeled: int = 4, n_pairs: int = 4,
                 tol: float = 1e-4) -> None:
        if every_n_steps < 1 or patience < 1:
            raise ValueError(f"every_n_steps and patience must be >= 1, got {every_n_steps}, {patience}")
        self.every, self.patience, self.tol = every_n_steps, patience, tol
        self.n_unlabeled, self.n_pairs = n_unlabeled, n_pairs
        self.probe: dict[str, Tensor] | None = None
        self.history: list[Probe] = []
        self.warned = False

    def _make_probe(self, trainer: L.Trainer, batch: Any) -> dict[str, Tensor]:
        probe = {"unlabeled": batch["unlabeled"]["lq"][: self.n_unlabeled].detach().clone()}
        val = getattr(trainer.datamodule, "datasets", {}).get("val") if trainer.datamodule is not None else None
        items = [val[i] for i in range(min(len(val), self.n_pairs))] if val is not None else []
        items = [it for it in items if it.get("gt") is not None]
        if items and len({tuple(it["lq"].shape) for it in items}) == 1:
            probe["lq"] = torch.stack([it["lq"] for it in items]).to(probe["unlabeled"].device)
            probe["gt"] = torch.stack([it["gt"] for it in items]).to(probe["unlabeled"].device)
        else:  # no validation pairs of one size: the first labeled pairs stand in
            probe["lq"] = batch["labeled"]["lq"][: self.n_pairs].detach().clone()
            probe["gt"] = batch["labeled"]["gt"][: self.n_pairs].detach().clone()
        return probe

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule, step: int) -> tuple[Probe, dict[str, float]]:
        """Restore the probe at the top level, score it; the probe record and the metrics to log."""
        assert self.probe is not None
        top = int(pl_module.hparams.get("top_level", 7))
        out_u = restore(pl_module.student, self.probe["unlabeled"], level=top)
        out_l = restore(pl_module.student, self.probe["lq"], level=top)
        ensemble = pl_module.ensemble
        # graded at a bounded size: full-size validation photos cost no float copy per member
        scores = [score_bounded(ensemble, out_u), score_bounded(ensemble, out_l)] \
            if out_u.shape[-2:] != out_l.shape[-2:] else [score_bounded(ensemble, torch.cat([out_u, out_l]))]
        fused = torch.cat([s.fused for s in scores]).nanmean()
        members = {n: torch.cat([s.normalized[n] for s in scores]).nanmean() for n in scores[0].normalized}
        value = float(psnr(out_l, self.probe["gt"]))
        clean = float(psnr(restore(pl_module.student, self.probe["gt"], level=top), self.probe["gt"]))
        colour = {COLOUR: float(colour_correlation(out_l, self.probe["gt"])),
                  COLOUR_INPUT: float(colour_correlation(out_u, self.probe["unlabeled"]))}
        witnesses = [s.name for s in ensemble.specs if s.reward_mode != "grad"]
        measures = {**{n: float(members[n]) for n in witnesses}, PSNR: value, **colour, CLEAN: clean}
        logged = {"reward_guard/fused": float(fused), "reward_guard/psnr": value, f"reward_guard/{CLEAN}": clean,
                  **{f"reward_guard/{n}": v for n, v in colour.items()},
                  **{f"reward_guard/{n}": float(v) for n, v in members.items()}}
        return Probe(step, float(fused), measures), logged

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.global_rank != 0:
            return
        if getattr(pl_module, "ensemble", None) is None or "unlabeled" not in batch:
            return  # nothing to probe: e.g. the supervised baseline (no ensemble, no unlabeled data)
        if self.probe is None:
            self.probe = self._make_probe(trainer, batch)
        if step % self.every != 0:
            return
        probe, logged = self.measure(pl_module, step)
        self.history.append(probe)
        message = None if self.warned else hacking_alarm(self.history, self.patience, self.tol)
        if message:
            self.warned = True

            rank_zero_warn(message)
            say(f"\n[reward guard] {message}\n", "quiet")
        logged["reward_guard/alarm"] = float(self.warned)
        if trainer.logger is not None:
            trainer.logger.log_metrics(logged, step=step)
