"""Study (not a test): does the student's ensemble score rise with the requested quality level?

    python pipelines/study_quality_control.py --out outputs/qc_study --students unet iqpir \
        --settings pair all_pairs --seeds 0 1 2 --steps 300

A thin wrapper of ``qualiteacher study`` (`qualiteacher.study.runner`): for each student, one
study whose modes are the preference settings below (stage-3 overrides on top of the full method),
all started from one shared warm-up per seed, measured on the held-out test images at every level
0..7 (the level dial: Spearman rho of level vs mean fused score, column ``rho``), with PSNR, SSIM
and every ensemble member. Nothing is held out of the ensemble here (the question is the dial, not
reward hacking). Results: ``OUT/<student>/study_summary.md``, ``study_runs.csv``, ``study.png``;
resumable like the study (rerun the same command).
"""
from __future__ import annotations

import argparse
from typing import Any

# Stage-3 model settings compared by this study (on top of the preset's stage-3 section).
SETTINGS: dict[str, dict[str, Any]] = {
    "pair": {"pref_mode": "pair", "low_levels": [4, 5, 6]},
    "all_pairs": {"pref_mode": "all_pairs", "low_levels": [1, 3, 5]},
    "all_pairs_wide": {"pref_mode": "all_pairs", "low_levels": [0, 2, 4, 6]},
    "all_pairs_full": {"pref_mode": "all_pairs", "low_levels": [0, 1, 2, 3, 4, 5, 6]},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="dehaze")
    p.add_argument("--preset", default="demo")
    p.add_argument("--data", default=None, help="data root (the demo data is built there when missing)")
    p.add_argument("--out", default="outputs/qc_study")
    p.add_argument("--students", nargs="+", default=["unet", "iqpir"], choices=("unet", "iqpir"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="stage-3 optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=None, help="override the preset's warm-up stage steps")
    p.add_argument("--stage3", nargs="*", default=[], help="extra stage-3 model overrides KEY=VALUE (YAML values)")
    p.add_argument("--accelerator", default=None, help="e.g. gpu (default: the preset's)")
    p.add_argument("--precision", default=None, help="e.g. bf16-mixed on a GPU")
    args = p.parse_args()

    from qualiteacher.study.runner import StudySettings, run_study

    for student in args.students:
        overrides = [f"student={student}", "stage3.model.lr=5.0e-4", *(f"stage3.model.{kv}" for kv in args.stage3)]
        for stage in ("stage1", "stage2", "fidelity"):
            if args.warmup_steps:
                overrides.append(f"{stage}.trainer.max_steps={args.warmup_steps}")
        for stage in ("stage1", "stage2", "fidelity", "stage3"):
            if args.accelerator:
                overrides.append(f"{stage}.trainer.accelerator={args.accelerator}")
        if args.precision:
            overrides.append(f"stage3.trainer.precision={args.precision}")
        run_study(StudySettings(task=args.task, preset=args.preset, seeds=tuple(args.seeds),
                                modes=tuple(args.settings), steps=args.steps, out=f"{args.out}/{student}",
                                held_out=None, data_root=args.data or f"{args.out}/demo_data",
                                overrides=tuple(overrides), variants=SETTINGS))


if __name__ == "__main__":
    main()
