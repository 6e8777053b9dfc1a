"""Benchmark: one stage-3 step, phase by phase, ours against a re-enactment of the released structure.

    python pipelines/benchmark_stage3.py --preset demo --device cpu
    python pipelines/benchmark_stage3.py --preset paper --device cuda --iqa paper --precision bf16 --batch 8 --size 512

Both steps run in the same process on the same batches, interleaved (one of ours, then one of the
re-enactment, ...), with the same student architecture, IQA members, sizes and batch:

- **ours**: ``QualiTeacherModule`` under a Lightning ``Trainer`` exactly as the pipeline trains
  it (``--precision``, ``--compile``), timed by wrapping its parts (teacher, ensemble, masks,
  student, reward, consistency, bank, backward, optimizer + EMA) with a small phase clock.
- **released**: the structure of the released QualiTeacher code, written out in
  ``benchmark_stage3_released.py`` with our loss terms (the same step pieces, on the module's
  settings: only the structure differs): the teacher called once per view, every IQA call one image (and one mask block) at a time with the reference
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
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.data.demo import build_demo
from qualiteacher.iqa.members import MemberSpec
from qualiteacher.iqa.presets import ensemble_from_specs, preset_specs
from qualiteacher.pipeline.api import plan_run, resolve_config
from qualiteacher.training.stage3 import QualiTeacherModule

# the benchmark's parts, beside this script (whose folder is on sys.path)
from benchmark_stage3_phases import PHASES, BackwardSplit, PhaseClock, instrument
from benchmark_stage3_released import Released


# ----------------------------------------------------------------------------------- set-up
def stage3_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 3's model arguments as configured, for the full step (after N) with the command's
    options; ``args.size`` and ``args.batch`` resolved from its data section."""
    overrides = list(args.override)
    if args.student:
        overrides.append(f"student={args.student}")
    cfg = resolve_config(args.task, args.preset, overrides=overrides)
    section = plan_run(cfg, ["stage3"], hardware=False).stage("stage3").section
    model = dict(section["model"])
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
    data_cfg = dict(section["data"])
    args.size = args.size or int(data_cfg.get("crop_size", 64))   # reported as resolved
    args.batch = args.batch or int(data_cfg.get("batch_size", 4))
    return model


def benchmark_batches(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.warmup + args.steps`` training batches of ``args.data`` (default: demo data built in a
    temporary folder)."""
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="qt-bench-"))
    if not args.data:
        n = max(8, 2 * args.batch)
        build_demo(root, seed=0, tasks=(args.task,), size=max(96, args.size), n_labeled=n, n_unlabeled=n,
                   n_test=1, n_clean=2, progress=False)
    dm = RestorationDataModule(labeled_root=str(root / args.task / "labeled"),
                               unlabeled_root=str(root / args.task / "unlabeled"), crop_size=args.size,
                               batch_size=args.batch, seed=0)
    dm.setup("fit")
    batches: list[dict[str, Any]] = []
    while len(batches) < args.warmup + args.steps:
        for item in dm.train_dataloader():
            batches.append(item[0] if isinstance(item, tuple) else item)
            if len(batches) >= args.warmup + args.steps:
                break
    return batches


def build_parts(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, Any]], list[str]]:
    """The configured stage-3 module, the re-enactment's ensemble when it differs from ours
    (else None), the benchmark's batches and notes."""
    notes: list[str] = []
    model = stage3_arguments(args)
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
    p = module.settings
    notes.append(f"student {p.student.kind} preset {p.student.preset}, crop {args.size} px, batch {args.batch}, "
                 f"IQA {p.grading.preset} ({', '.join(s.name for s in specs)}; native NIQE {args.native_niqe}), "
                 f"pref_mode {p.preference.mode}, pref_levels_per_step {p.preference.levels_per_step}, "
                 f"refresh_every {p.teacher.refresh_every}, mask_block {p.grading.mask_block}")
    return module, reference, benchmark_batches(args), notes


def run(args: argparse.Namespace) -> dict[str, Any]:
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
