"""Benchmark: one stage-3 step, phase by phase, ours against a re-enactment of the released structure.

    python pipelines/benchmark_stage3.py --preset demo --device cpu
    python pipelines/benchmark_stage3.py --preset paper --device cuda --iqa paper --precision bf16 --batch 8 --size 512

Both steps run in the same process on the same batches, interleaved (one of ours, then one of the
re-enactment, ...), with the same student architecture, IQA members, sizes and batch:

- **ours**: ``QualiTeacherModule`` under a Lightning ``Trainer`` exactly as the pipeline trains
  it (``--precision``, ``--compile``), timed by wrapping its parts (teacher, ensemble, masks,
  student, reward, consistency, bank, backward, optimizer + EMA) with a small phase clock.
- **released**: the structure of the released QualiTeacher code, written out below: the teacher
  called once per view, every IQA call one image (and one mask block) at a time with the reference
  members (pyiqa's float64 NIQE / BRISQUE on images upsampled to the member's minimum size), one
  student forward per condition (each bank slot, each ranked level, the crop), float32. It ranks
  as many levels as ours (with ``pref_levels_per_step`` one subset for the batch, same estimator)
  and every candidate gets a mask and a bank offer. The ``offline`` preset's NIQE grades ours at
  the image's own size (member option ``native: true``); the re-enactment always upsamples, and
  ``--upsampled-niqe`` makes ours upsample too (the preset before that default).
On the CPU the clock is the process's CPU time by default (``--clock``), so other processes on a
shared machine inflate it less than wall time; ratios come from the same run.

Phases are exclusive (a phase nested in another is not counted twice); the student's and the
graders' shares of the backward pass are split with gradient hooks at the reward's input and
output. ``graders`` sums every second spent inside the IQA ensemble (grading, masks, rewards
forward and backward, wherever it is called): ``iqa_share = graders / step``. With ``--iqa paper``
and no weight files the members get random weights (timings only, never scores).
Prints a table and one JSON line ``{"ours_s", "released_s", "speedup", "iqa_share", "device", ...}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

PHASES = ("teacher views", "candidate grading", "masks", "student fwd", "student bwd", "reward fwd",
          "reward bwd", "consistency", "bank", "optimizer/EMA", "other")


# ----------------------------------------------------------------------------------- timing
class PhaseClock:
    """Exclusive time per phase, plus ``graders``: time inside the IQA ensemble, counted once however
    calls nest. ``wall``: ``perf_counter`` (with ``torch.cuda.synchronize`` at every boundary on
    CUDA); ``cpu``: the process's CPU time, which other processes on a shared machine do not inflate."""

    def __init__(self, device: torch.device, kind: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        self._read = time.process_time if kind == "cpu" else time.perf_counter
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [name, absorbing, resumed_at]
        self._grader_depth = 0
        self._grader_t0 = 0.0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self._read()

    @contextmanager
    def phase(self, name: str, absorb: bool = False) -> Iterator[None]:
        if self._stack and self._stack[-1][1]:  # inside an absorbing phase: counted there
            yield
            return
        t = self.now()
        if self._stack:
            self.totals[self._stack[-1][0]] += t - self._stack[-1][2]
        self._stack.append([name, absorb, t])
        try:
            yield
        finally:
            t = self.now()
            top = self._stack.pop()
            self.totals[top[0]] += t - top[2]
            if self._stack:
                self._stack[-1][2] = t

    @contextmanager
    def graders(self) -> Iterator[None]:
        if self._grader_depth == 0:
            self._grader_t0 = self.now()
        self._grader_depth += 1
        try:
            yield
        finally:
            self._grader_depth -= 1
            if self._grader_depth == 0:
                self.totals["graders"] += self.now() - self._grader_t0

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def reset(self) -> None:
        self.totals.clear()


def wrap(obj: Any, attr: str, fn: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``obj.attr`` (an instance attribute shadowing the method) by ``fn(original)``."""
    setattr(obj, attr, fn(getattr(obj, attr)))


def timed(clock: PhaseClock, name: str, absorb: bool = False, grader: bool = False):
    def deco(orig: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with clock.phase(name, absorb):
                if not grader:
                    return orig(*args, **kwargs)
                with clock.graders():
                    return orig(*args, **kwargs)
        return call
    return deco


class BackwardSplit:
    """Hooks that time the backward pass through each reward call (its output's gradient arriving
    -> its input's gradient computed); the union of those intervals is the graders' share of a
    backward pass (the intervals of several reward calls nest: their gradients arrive together),
    the rest is the student's."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock
        self.intervals: list[tuple[float, float]] = []

    def watch(self, images: Tensor, reward: Tensor) -> None:
        if not (images.requires_grad and reward.requires_grad):
            return
        start: list[float] = []
        reward.register_hook(lambda g: start.append(self.clock.now()))

        def done(g: Tensor) -> None:
            if start:
                self.intervals.append((start.pop(), self.clock.now()))
        images.register_hook(done)

    @property
    def seconds(self) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    @contextmanager
    def backward(self) -> Iterator[None]:
        """A backward pass: its time is "student bwd" except the graders' share ("reward bwd")."""
        self.intervals = []
        with self.clock.phase("student bwd", absorb=True):
            yield
        graders = self.seconds
        self.clock.add("student bwd", -graders)
        self.clock.add("reward bwd", graders)
        self.clock.add("graders", graders)


def instrument(module: Any, clock: PhaseClock, split: BackwardSplit) -> None:
    """Time a ``QualiTeacherModule``'s parts in place (instance attributes only)."""
    ens = module.ensemble
    wrap(module.teacher, "forward", timed(clock, "teacher views", absorb=True))
    wrap(ens, "forward", timed(clock, "candidate grading", absorb=True, grader=True))
    wrap(module, "_masks", timed(clock, "masks", absorb=True))
    wrap(module.student, "forward", timed(clock, "student fwd"))
    wrap(module, "_crop_consistency", timed(clock, "consistency", absorb=True))
    for name in ("accepts", "offer_batch", "gather"):
        wrap(module.bank, name, timed(clock, "bank"))

    def reward(orig: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def call(images: Tensor) -> Tensor:
            with clock.phase("reward fwd", absorb=True), clock.graders():
                out = orig(images)
            split.watch(images, out)
            return out
        return call
    wrap(module, "_reward", reward)

    def backward(orig: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            with split.backward():
                orig(*args, **kwargs)
        return call
    wrap(module, "backward", backward)
    # optimizer_step runs Lightning's closure (training_step + backward): their parts are
    # phases of their own, the rest of training_step is "other"
    wrap(module, "training_step", timed(clock, "other"))
    wrap(module, "optimizer_step", timed(clock, "optimizer/EMA"))


# ----------------------------------------------------------------------------------- the released structure
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
    """The released code's step structure on copies of our module's student, teacher and bank."""

    def __init__(self, module: Any, clock: PhaseClock, device: torch.device, ensemble: Any = None) -> None:
        from qualiteacher.teacher.bank import PseudoLabelBank

        hp = module.hparams
        self.hp, self.clock, self.device = hp, clock, device
        self.split = BackwardSplit(clock)
        self.student = copy.deepcopy(module.student).to(device)
        self.student._compiled_call_impl = None  # the re-enactment runs eager, whatever --compile does to ours
        self.teacher = copy.deepcopy(module.teacher).to(device).eval()
        self.ensemble = (ensemble if ensemble is not None else module.ensemble).to(device)
        self.photometric = copy.deepcopy(module.photometric).to(device)
        self.bank = PseudoLabelBank(hp.bank_k)
        self.gen = torch.Generator().manual_seed(hp.seed + 1)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
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
        k = min(self.hp.mask_block, h, w)
        if k >= max(h, w):
            return fused.view(1, 1, 1).expand(1, h, w)
        rows = torch.linspace(0, h - k, -(-h // k)).round().long().tolist()
        cols = torch.linspace(0, w - k, -(-w // k)).round().long().tolist()
        grid = torch.stack([torch.stack([self._score(image[None, :, r:r + k, c:c + k])[0] for c in cols])
                            for r in rows])
        return F.interpolate(grid[None, None], size=(h, w), mode="bilinear", align_corners=False)[0]

    def step(self, batch: dict[str, dict[str, Any]]) -> None:
        from qualiteacher.losses.consistency import crop_consistency_loss, random_window
        from qualiteacher.losses.preference import (
            all_pairs_preference_loss,
            draw_level_subsets,
            preference_loss,
            sampled_all_pairs_preference_loss,
        )
        from qualiteacher.losses.pseudo import pseudo_label_loss
        from qualiteacher.teacher.ema import ema_update_
        from qualiteacher.teacher.multiaug import multi_augment
        from qualiteacher.teacher.views import apply_view, invert_view

        hp, clock, dev = self.hp, self.clock, self.device
        lab, unl = batch["labeled"], batch["unlabeled"]
        x, ids = unl["lq"].to(dev), list(unl["id"])
        b = x.shape[0]
        with reference_members(self.ensemble):
            if self.step_no % hp.refresh_every == 0 or not all(i in self.bank for i in ids):
                cands, owner = [], []
                with torch.no_grad(), clock.phase("teacher views", absorb=True):
                    for v in hp.views:  # the teacher once per view
                        cands.append(invert_view(self.teacher(apply_view(x, v), None).image.clamp(0, 1), v))
                        owner.append(torch.arange(b, device=dev))
                with torch.no_grad():
                    if hp.n_aug_variants > 0:
                        variants = multi_augment(cands[0], x, hp.n_aug_variants, tuple(hp.aug_kinds),
                                                 hp.aug_max_strength, generator=self.gen)
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
            # student: one forward per condition
            with clock.phase("bank", absorb=True):
                pls, masks, _, scores, own = self.bank.gather(ids, device=dev)
            x_s = self.photometric(x).clamp(0, 1)
            with clock.phase("student fwd", absorb=True):
                sup = self.student(lab["lq"].to(dev), None)
                outs = []
                for slot in range(self.bank.k):  # bank slot j of every image that has one
                    sel = torch.tensor([i for i in range(own.numel())
                                        if int((own[:i] == own[i]).sum()) == slot], dtype=torch.long)
                    if sel.numel():
                        lv = self.ensemble.level_of(scores[sel])
                        outs.append((sel, self.student(x_s[own[sel]], lv).image))
            l_pl = sum(pseudo_label_loss(o, pls[sel], masks[sel], own[sel], b) for sel, o in outs)
            l_sup = F.l1_loss(sup.image, lab["gt"].to(dev))
            grid = sorted(set(hp.low_levels) | {hp.top_level})
            levels_ranked = (grid if hp.pref_mode == "all_pairs"
                             else [hp.top_level, int(torch.tensor(hp.low_levels)[torch.randint(
                                 len(hp.low_levels), (1,), generator=self.gen)])])
            m = getattr(hp, "pref_levels_per_step", None)
            subset = hp.pref_mode == "all_pairs" and m is not None and m < len(grid)
            if subset:  # as many levels as ours ranks (one subset for the batch: a forward per level)
                levels_ranked = draw_level_subsets(1, torch.tensor(grid), m, hp.top_level, self.gen)[0].tolist()
            rewards, top = [], None
            for q in levels_ranked:
                with clock.phase("student fwd", absorb=True):
                    out = self.student(x_s, torch.full((b,), q, device=dev)).image
                if q == hp.top_level:
                    top = out
                with clock.phase("reward fwd", absorb=True):
                    rewards.append(self._reward(out))  # one image at a time
            r = torch.stack(rewards, 1)  # (B, L)
            if hp.pref_mode == "all_pairs":
                per_level = hp.pref_delta / max(1, hp.top_level - min(hp.low_levels))
                lv = torch.tensor(levels_ranked, device=dev)
                l_pref = (sampled_all_pairs_preference_loss(r, lv.expand(b, -1), len(grid), hp.top_level,
                                                            hp.pref_beta, per_level) if subset
                          else all_pairs_preference_loss(r, lv, hp.pref_beta, per_level))
            else:
                best = torch.full((b,), -1e4, device=dev).scatter_reduce(0, own, scores.float(), reduce="amax")
                l_pref = preference_loss(r[:, 0], r[:, 1], best, hp.pref_beta, hp.pref_delta,
                                         hp.pref_lambda, hp.pref_lambda2).total
            with clock.phase("consistency", absorb=True):
                h, w = x_s.shape[-2:]
                mult = getattr(self.student, "size_multiple", 8)
                win = random_window(h, w, hp.crop_fraction, mult, self.gen)
                of_crop = self.student(win(x_s), torch.full((b,), hp.top_level, device=dev)).image
                l_crop = crop_consistency_loss(self._reward(win(top)), self._reward(of_crop))
            total = (hp.w_sup * l_sup + hp.w_pl * l_pl + hp.w_pref * hp.pref_lambda * l_pref
                     + hp.w_crop * l_crop + hp.w_aux * sup.aux_loss)
            with self.split.backward():
                total.backward()
            with clock.phase("optimizer/EMA", absorb=True):
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                ema_update_(self.teacher, self.student, hp.ema_decay)
        self.step_no += 1


# ----------------------------------------------------------------------------------- set-up
def build_parts(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, Any]], list[str]]:
    """The configured stage-3 module, the re-enactment's ensemble when it differs from ours
    (else None), the benchmark's batches and notes."""
    from qualiteacher.data.datamodule import RestorationDataModule
    from qualiteacher.data.demo import build_demo
    from qualiteacher.iqa.members import MemberSpec
    from qualiteacher.iqa.presets import ensemble_from_specs, preset_specs
    from qualiteacher.pipeline.resolve import resolve_config
    from qualiteacher.pipeline.sections import stage_section
    from qualiteacher.training.stage3 import QualiTeacherModule

    notes: list[str] = []
    overrides = list(args.override)
    if args.student:
        overrides.append(f"student={args.student}")
    cfg = resolve_config(args.task, args.preset, overrides=overrides)
    section = stage_section(cfg, "stage3")
    model = dict(section["model"])
    data_cfg = dict(section["data"])
    model.update(init_from=None, pref_start_step=0, crop_start_step=0)  # the full step (after N)
    if args.iqa:
        model["iqa_preset"] = args.iqa
    if args.pref_levels is not None:
        model["pref_levels_per_step"] = args.pref_levels
    if args.compile:
        model["compile_student"] = True
    if args.precision == "bf16":
        model["iqa_bf16"] = True
    model.setdefault("student", cfg.student)
    crop = args.size or int(data_cfg.get("crop_size", 64))
    batch = args.batch or int(data_cfg.get("batch_size", 4))
    args.size, args.batch = crop, batch  # reported as resolved
    specs = preset_specs(model["iqa_preset"], model.get("task"))

    def make(member_specs: list[MemberSpec]) -> Any:
        try:
            return ensemble_from_specs(member_specs, model.get("task"), model.get("iqa_weights_dir"))
        except FileNotFoundError as err:  # MissingWeightsError: no weight files here
            first = str(err).splitlines()[0]
            notes.append(f"IQA preset {model['iqa_preset']!r}: weights missing ({first}); members built "
                         f"with RANDOM weights -- timings only, the scores mean nothing")
            return ensemble_from_specs(member_specs, model.get("task"), random_weights=True)

    # the released structure grades with NIQE on images upsampled to its 192-px minimum
    upsampled = [MemberSpec.from_dict({**s.to_dict(), "options": {k: v for k, v in s.options.items() if k != "native"}})
                 if s.backend == "offline:niqe" else s for s in specs]
    reference = None
    if args.upsampled_niqe:
        specs = upsampled
    elif upsampled != specs:
        reference = make(upsampled)
    args.native_niqe = any(s.options.get("native", False) for s in specs if s.backend == "offline:niqe")
    module = QualiTeacherModule(**model, ensemble=make(specs))
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="qt-bench-"))
    if not args.data:
        n = max(8, 2 * batch)
        build_demo(root, seed=0, tasks=(args.task,), size=max(96, crop), n_labeled=n, n_unlabeled=n,
                   n_test=1, n_clean=2, progress=False)
    dm = RestorationDataModule(labeled_root=str(root / args.task / "labeled"),
                               unlabeled_root=str(root / args.task / "unlabeled"), crop_size=crop,
                               batch_size=batch, seed=0)
    dm.setup("fit")
    batches: list[dict[str, Any]] = []
    while len(batches) < args.warmup + args.steps:
        for item in dm.train_dataloader():
            batches.append(item[0] if isinstance(item, tuple) else item)
            if len(batches) >= args.warmup + args.steps:
                break
    notes.append(f"student {model['student']} preset {model['preset']}, crop {crop} px, batch {batch}, "
                 f"IQA {model['iqa_preset']} ({', '.join(s.name for s in specs)}; native NIQE "
                 f"{args.native_niqe}), pref_mode "
                 f"{model.get('pref_mode', 'pair')}, pref_levels_per_step {model.get('pref_levels_per_step')}, "
                 f"refresh_every {model.get('refresh_every', 1)}, mask_block {model.get('mask_block', 144)}")
    return module, reference, batches, notes


def run(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    device = torch.device(args.device)
    module, reference, batches, notes = build_parts(args)
    clock = PhaseClock(device, args.clock)
    per_step: dict[str, list[dict[str, float]]] = {"ours": [], "released": []}
    released: list[Released] = []

    class Interleave(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            released.append(Released(pl_module, clock, device, reference))  # copies first: wrappers stay on ours
            instrument(pl_module, clock, BackwardSplit(clock))

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            clock.reset()
            self.t0 = clock.now()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            total = clock.now() - self.t0
            per_step["ours"].append({**clock.totals, "step": total})
            clock.reset()
            if args.no_released:
                return
            moved = {part: {k: v.to(device) if isinstance(v, Tensor) else v for k, v in d.items()}
                     for part, d in batch.items()}
            t0 = clock.now()
            released[0].step(moved)
            per_step["released"].append({**clock.totals, "step": clock.now() - t0})

    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.precision]
    trainer = L.Trainer(max_steps=len(batches), accelerator="gpu" if device.type == "cuda" else "cpu",
                        devices=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Interleave()],
                        num_sanity_val_steps=0, limit_val_batches=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return summarise(per_step, args, device, notes)


def summarise(per_step: dict[str, list[dict[str, float]]], args: argparse.Namespace, device: torch.device,
              notes: list[str]) -> dict[str, Any]:
    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        rows = rows[args.warmup:]
        keys = {k for r in rows for k in r}
        return {k: sum(r.get(k, 0.0) for r in rows) / max(1, len(rows)) for k in keys}

    ours, rel = mean(per_step["ours"]), mean(per_step["released"])
    rel.setdefault("step", float("nan"))
    for m in (ours, rel):
        m["other"] = max(0.0, m["step"] - sum(m.get(p, 0.0) for p in PHASES if p != "other"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print("\n".join(f"# {n}" for n in notes))
    print(f"# {len(per_step['ours']) - args.warmup} timed steps after {args.warmup} warm-up, device {name}, "
          f"torch threads {torch.get_num_threads()}, precision {args.precision}, compile {args.compile}, "
          f"clock {args.clock}")
    print(f"{'phase':<20}{'ours (s)':>12}{'released (s)':>14}")
    for p in PHASES + ("graders", "step"):
        print(f"{p:<20}{ours.get(p, 0.0):>12.4f}{rel.get(p, 0.0):>14.4f}")
    timed_rel = not args.no_released
    result = {"ours_s": round(ours["step"], 4), "released_s": round(rel["step"], 4) if timed_rel else None,
              "speedup": round(rel["step"] / ours["step"], 2) if timed_rel else None,
              "iqa_share": round(ours.get("graders", 0.0) / ours["step"], 3),
              "released_iqa_share": round(rel.get("graders", 0.0) / rel["step"], 3) if timed_rel else None,
              "device": name, "batch": args.batch, "size": args.size, "pref_levels": args.pref_levels,
              "preset": args.preset, "iqa": args.iqa or "preset", "precision": args.precision,
              "clock": args.clock, "native_niqe": args.native_niqe}
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=("demo", "paper", "tiny"))
    p.add_argument("--task", default="dehaze")
    p.add_argument("--student", choices=("iqpir", "unet"), default=None)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--iqa", choices=("offline", "paper"), default=None, help="IQA preset (default: the config's)")
    p.add_argument("--upsampled-niqe", action="store_true",
                   help="ours: offline NIQE on images upsampled to 192 px, as the re-enactment (not at the "
                        "image's own size, the preset's default)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true", help="torch.compile the student (ours)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="crop size (default: the preset's)")
    p.add_argument("--pref-levels", type=int, default=None, help="ours: pref_levels_per_step")
    p.add_argument("--no-released", action="store_true", help="time ours only (scaling tables)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", default=None, help="data root (default: demo data generated in a temp folder)")
    p.add_argument("--override", action="append", default=[], help="config override, e.g. stage3.model.mask_block=16")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="cpu: process CPU time (default on CPU: robust to a shared machine); wall (CUDA)")
    p.add_argument("--allow-download", action="store_true", help="let IQA members download weights")
    args = p.parse_args(argv)
    args.clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    if args.clock == "cpu" and args.device == "cuda":
        p.error("--clock cpu measures nothing of the GPU's work: use --clock wall with --device cuda")
    if not args.allow_download:
        os.environ.setdefault("QUALITEACHER_OFFLINE", "1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
