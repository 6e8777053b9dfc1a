"""The released QualiTeacher step structure, re-enacted for ``benchmark_stage3.py`` (see its
docstring): teacher once per view, every IQA call one image (and one mask block) at a time with the
reference members, one student forward per condition, float32. The loss terms are ours: the same
step pieces on the module's settings."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.losses.consistency import crop_consistency_loss, crop_windows
from qualiteacher.losses.preference import PreferenceLoss, draw_ranked_levels, preference_term
from qualiteacher.losses.pseudo import pseudo_label_loss
from qualiteacher.teacher.bank import PseudoLabelBank
from qualiteacher.teacher.ema import ema_update_
from qualiteacher.teacher.multiaug import multi_augment
from qualiteacher.teacher.views import apply_view, invert_view
from qualiteacher.training.stage3_steps import BestPseudoLabels, Terms, best_pl_reward, supervised_loss, weighted_total
from benchmark_stage3_phases import BackwardSplit, PhaseClock


@contextmanager
def reference_members(ensemble: Any) -> Iterator[None]:
    """Members run their reference implementation (pyiqa / float64), not our fast paths."""
    flags = [(m, m.fast) for m in ensemble.modules() if isinstance(getattr(m, "fast", None), bool)]
    for m, _ in flags:
        m.fast = False
    try:
        yield
    finally:
        for m, old in flags:
            m.fast = old


class Released:
    """The released code's step structure on copies of our module's student, teacher and bank. Its
    loss terms are ours (the same step pieces, ``qualiteacher.training.stage3_steps`` and
    ``qualiteacher.losses``, on the module's ``settings``): only the structure differs."""

    def __init__(self, module: Any, clock: PhaseClock, device: torch.device, ensemble: Any = None) -> None:
        s = module.settings
        self.s, self.clock, self.device = s, clock, device
        self.split = BackwardSplit(clock)
        self.student = copy.deepcopy(module.student).to(device)
        self.student._compiled_call_impl = None  # the re-enactment runs eager, whatever --compile does to ours
        self.teacher = copy.deepcopy(module.teacher).to(device).eval()
        self.ensemble = (ensemble if ensemble is not None else module.ensemble).to(device)
        self.photometric = copy.deepcopy(module.photometric).to(device)
        self.bank = PseudoLabelBank(s.teacher.bank_k)
        self.gen = torch.Generator().manual_seed(s.seed + 1)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        o = s.optim
        self.opt = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.step_no = 0

    def _score(self, images: Tensor) -> Tensor:
        with self.clock.graders():
            return torch.cat([self.ensemble(im[None]).fused for im in images])

    def _reward(self, images: Tensor) -> Tensor:
        out = []
        for im in images:
            im = im[None]
            with self.clock.graders():
                r = self.ensemble.reward(im)
            self.split.watch(im, r)
            out.append(r)
        return torch.cat(out)

    def _mask(self, image: Tensor, fused: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        k = min(self.s.grading.mask_block, h, w)
        if k >= max(h, w):
            return fused.view(1, 1, 1).expand(1, h, w)
        rows = torch.linspace(0, h - k, -(-h // k)).round().long().tolist()
        cols = torch.linspace(0, w - k, -(-w // k)).round().long().tolist()
        grid = torch.stack([torch.stack([self._score(image[None, :, r:r + k, c:c + k])[0] for c in cols])
                            for r in rows])
        return F.interpolate(grid[None, None], size=(h, w), mode="bilinear", align_corners=False)[0]

    @torch.no_grad()
    def _refresh(self, x: Tensor, ids: list[str]) -> None:
        t, clock, b = self.s.teacher, self.clock, x.shape[0]
        cands, owner = [], []
        with clock.phase("teacher views", absorb=True):
            for v in t.views:  # the teacher once per view
                cands.append(invert_view(self.teacher(apply_view(x, v), None).image.clamp(0, 1), v))
                owner.append(torch.arange(b, device=x.device))
        if t.n_aug_variants > 0:
            variants = multi_augment(cands[0], x, t.n_aug_variants, t.aug_kinds, t.aug_max_strength,
                                     generator=self.gen)
            cands.append(variants.images)
            owner.append(variants.source)
        cands_t, owner_t = torch.cat(cands), torch.cat(owner)
        with clock.phase("candidate grading", absorb=True):
            fused = self._score(cands_t)  # one image at a time
        levels = self.ensemble.level_of(fused)
        for i in range(cands_t.shape[0]):  # every candidate: its mask, then the bank
            with clock.phase("masks", absorb=True):
                mask = self._mask(cands_t[i], fused[i])
            with clock.phase("bank", absorb=True):
                self.bank.offer(ids[int(owner_t[i])], cands_t[i], mask, float(fused[i]), int(levels[i]))

    def _pseudo_label_loss(self, x_s: Tensor, ids: list[str]) -> tuple[Tensor, BestPseudoLabels]:
        with self.clock.phase("bank", absorb=True):
            pls, masks, _, scores, own = self.bank.gather(ids, device=self.device)
        outs = []
        with self.clock.phase("student fwd", absorb=True):
            for slot in range(self.bank.k):  # one forward per bank slot j (of every image that has one)
                sel = torch.tensor([i for i in range(own.numel())
                                    if int((own[:i] == own[i]).sum()) == slot], dtype=torch.long)
                if sel.numel():
                    lv = self.ensemble.level_of(scores[sel])
                    outs.append((sel, self.student(x_s[own[sel]], lv).image))
        b = x_s.shape[0]
        l_pl = sum(pseudo_label_loss(o, pls[sel], masks[sel], own[sel], b) for sel, o in outs)
        return l_pl, BestPseudoLabels(pls, scores, own)

    def _preference(self, x_s: Tensor, best: BestPseudoLabels) -> tuple[PreferenceLoss, Tensor]:
        """L_pref with one forward per ranked level (one draw of levels for the batch), and the
        output at the top level."""
        s, clock, b = self.s, self.clock, x_s.shape[0]
        ranked = draw_ranked_levels(s.preference, 1, self.gen, self.device)
        rewards, outs = [], []
        for q in ranked.levels[:, 0].tolist():
            with clock.phase("student fwd", absorb=True):
                outs.append(self.student(x_s, torch.full((b,), q, device=self.device)).image)
            with clock.phase("reward fwd", absorb=True):
                rewards.append(self._reward(outs[-1]))  # one image at a time
        r_pl_best = (best_pl_reward(self._reward, self.ensemble.reward_is_fused, best, b)
                     if s.preference.uses_best_pseudo_label else None)
        pref = preference_term(s.preference, torch.stack(rewards), ranked.levels.expand(-1, b), r_pl_best)
        return pref, outs[ranked.top]

    def _consistency(self, x_s: Tensor, top: Tensor) -> Tensor:
        h, w = x_s.shape[-2:]
        mult = getattr(self.student, "size_multiple", 8)
        win_out, win_in = crop_windows(self.s.consistency, h, w, mult, self.gen)
        level = torch.full((x_s.shape[0],), self.s.top_level, device=self.device)
        of_crop = self.student(win_in(x_s), level).image
        return crop_consistency_loss(self._reward(win_out(top)), self._reward(of_crop))

    def step(self, batch: dict[str, dict[str, Any]]) -> None:
        s, clock = self.s, self.clock
        x, ids = batch["unlabeled"]["lq"].to(self.device), list(batch["unlabeled"]["id"])
        with reference_members(self.ensemble):
            if self.step_no % s.teacher.refresh_every == 0 or not all(i in self.bank for i in ids):
                self._refresh(x, ids)
            x_s = self.photometric(x).clamp(0, 1)
            with clock.phase("student fwd", absorb=True):
                l_sup, aux = supervised_loss(self.student, batch["labeled"])
            l_pl, best = self._pseudo_label_loss(x_s, ids)
            pref, top = self._preference(x_s, best)
            with clock.phase("consistency", absorb=True):
                l_crop = self._consistency(x_s, top)
            total = weighted_total(s.weights, Terms(l_sup, l_pl, pref, l_crop, aux))
            with self.split.backward():
                total.backward()
            with clock.phase("optimizer/EMA", absorb=True):
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                ema_update_(self.teacher, self.student, s.teacher.ema_decay)
        self.step_no += 1
