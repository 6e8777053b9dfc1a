"""Study (not a test): does the student's ensemble score rise with the requested quality level?

    python pipelines/study_quality_control.py --out outputs/qc_study --students unet iqpir \
        --settings pair all_pairs --seeds 0 1 2 --steps 300

For each student the warm-up (stage 1 + 2 for IQPIR, the supervised warm-up for the U-Net) runs
once from the ``demo`` preset (seed 0) on the demo data; then for every setting and seed stage 3
runs from that warm-up and the held-out test images (photos never seen in training) are restored
at every level 0..7 and scored with the stage's IQA ensemble. Reported per run: Spearman rho
between the level and the mean fused score (the quality-control check of issue 5), the fused
score of input / teacher / student at the top level, PSNR, and the wall-clock time. No MLflow:
this driver also runs on a bare GPU machine. Results: ``OUT/qc_runs.csv`` and ``OUT/qc_summary.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch

from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.data.io import read_image, to_tensor
from qualiteacher.data.layouts import read_layout
from qualiteacher.eval.nriqa import level_spearman, score_levels
from qualiteacher.eval.report import build_restorers, evaluate_restorers, markdown_table, summary_table
from qualiteacher.pipeline import stage_classes, stage_section
from qualiteacher.pipeline_config import resolve_config

# Stage-3 model settings compared by the study (on top of the preset's stage-3 section).
SETTINGS: dict[str, dict[str, Any]] = {
    "pair": {"pref_mode": "pair", "low_levels": [4, 5, 6]},
    "all_pairs": {"pref_mode": "all_pairs", "low_levels": [1, 3, 5]},
    "all_pairs_wide": {"pref_mode": "all_pairs", "low_levels": [0, 2, 4, 6]},
    "all_pairs_full": {"pref_mode": "all_pairs", "low_levels": [0, 1, 2, 3, 4, 5, 6]},
}


def _trainer(steps: int, accelerator: str, precision: str | None) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     precision=precision, num_sanity_val_steps=0)


def warm_up(cfg: dict[str, Any], accelerator: str) -> None:
    """Stage 1 + 2 (IQPIR) or the U-Net warm-up, into ``cfg['out_dir']``, skipped when present."""
    out = Path(cfg["out_dir"])
    stages = ["stage1", "stage2"] if cfg["student"] == "iqpir" else ["stage2"]
    table = out / "labeled_quality.csv"
    if cfg["student"] == "iqpir" and not table.is_file():
        from qualiteacher.iqa.cache import grade_clean_images

        out.mkdir(parents=True, exist_ok=True)
        grade_clean_images(Path(cfg["data_root"]) / cfg["task"] / "labeled" / "gt", cfg["task"],
                           cfg["stage3"]["model"].get("iqa_preset", "offline"),
                           out / "iqa_cache.parquet").to_csv(table, index=False)
    for stage in stages:
        final = out / stage / "final.ckpt"
        if final.is_file():
            continue
        section = stage_section(cfg, stage)
        L.seed_everything(0, workers=True, verbose=False)
        model = stage_classes(cfg["student"])[stage](**section["model"])
        data = RestorationDataModule(**section["data"])
        trainer = _trainer(int(section["trainer"]["max_steps"]), accelerator, None)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        final.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(final)
        print(f"[warm-up] {cfg['student']} {stage}: {time.perf_counter() - start:.0f} s", flush=True)


def test_images(cfg: dict[str, Any]) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    records = read_layout("paired", Path(cfg["data_root"]) / cfg["task"] / "test")
    return [(r.id, to_tensor(read_image(r.lq)), None if r.gt is None else to_tensor(read_image(r.gt)))
            for r in records]


def run_stage3(cfg: dict[str, Any], setting: str, seed: int, steps: int, accelerator: str,
               precision: str | None) -> dict[str, Any]:
    section = stage_section(cfg, "stage3")
    model_args = {**section["model"], **copy.deepcopy(SETTINGS[setting]), "seed": seed}
    data_args = {**section["data"], "seed": seed}
    L.seed_everything(seed, workers=True, verbose=False)
    module = stage_classes(cfg["student"])["stage3"](**model_args)
    trainer = _trainer(steps, accelerator, precision)
    start = time.perf_counter()
    trainer.fit(module, datamodule=RestorationDataModule(**data_args))
    seconds = time.perf_counter() - start
    device = module.device
    module.eval()
    test = [(i, lq.to(device), None if gt is None else gt.to(device)) for i, lq, gt in test_images(cfg)]
    tile = int(section["data"].get("crop_size", 64))
    ensemble = module.ensemble
    levels = score_levels(module.student, [lq for _, lq, _ in test], ensemble, levels=range(8), tile=tile,
                          ids=[i for i, _, _ in test])
    top = int(module.hparams.top_level)
    table = summary_table(evaluate_restorers(build_restorers(module.student, module.teacher, (top,), tile),
                                             test, ensemble, device=device))
    means = levels.groupby("level")["fused"].mean()
    return {
        "student": cfg["student"], "setting": setting, "seed": seed, "steps": steps,
        "rho": level_spearman(levels), "fused_input": float(table.loc["input", "fused"]),
        "fused_teacher": float(table.loc["teacher", "fused"]),
        "fused_student": float(table.loc[f"student@{top}", "fused"]),
        "psnr_teacher": float(table.loc["teacher", "psnr"]),
        "psnr_student": float(table.loc[f"student@{top}", "psnr"]),
        "level_means": json.dumps([round(float(v), 4) for v in means.to_numpy()]),
        "train_s": round(seconds, 1), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def summarize(df: pd.DataFrame) -> str:
    grouped = df.groupby(["student", "setting"], sort=False)
    table = grouped.agg(runs=("rho", "size"), rho_mean=("rho", "mean"), rho_min=("rho", "min"),
                        above_0_8=("rho", lambda r: int((r > 0.8).sum())),
                        teacher=("fused_teacher", "mean"), student_top=("fused_student", "mean"),
                        train_s=("train_s", "mean"))
    table.index = [f"{student} {setting}" for student, setting in table.index]
    table.index.name = "student setting"
    return markdown_table(table, digits=3, bold_best=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="dehaze")
    p.add_argument("--preset", default="demo")
    p.add_argument("--data", default=None, help="demo data root (built there when missing)")
    p.add_argument("--out", default="outputs/qc_study")
    p.add_argument("--students", nargs="+", default=["unet", "iqpir"], choices=("unet", "iqpir"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="stage-3 optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=None, help="override the preset's stage-1/2 steps")
    p.add_argument("--stage3", nargs="*", default=[], help="extra stage-3 model overrides KEY=VALUE (YAML values)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default=None, help="e.g. bf16-mixed on a GPU")
    args = p.parse_args()

    out = Path(args.out)
    data = Path(args.data) if args.data else out / "demo_data"
    if not (data / args.task / "labeled").is_dir():
        from qualiteacher.data.demo import build_demo

        build_demo(data, tasks=(args.task,), overwrite=True)
    cfgs = {}
    for student in args.students:
        overrides = [f"student={student}", f"data_root={data}", f"out_dir={out / ('warmup-' + student)}",
                     "stage3.model.lr=5.0e-4"]
        if args.warmup_steps:
            overrides += [f"stage1.trainer.max_steps={args.warmup_steps}", f"stage2.trainer.max_steps={args.warmup_steps}"]
        overrides += [f"stage3.model.{kv}" for kv in args.stage3]
        cfgs[student] = resolve_config(args.task, args.preset, overrides=overrides)
        warm_up(cfgs[student], args.accelerator)
    rows: list[dict[str, Any]] = []
    csv = out / "qc_runs.csv"
    # seeds outermost: a run cut short still holds every student and setting for the first seeds
    for seed in args.seeds:
        for student, cfg in cfgs.items():
            for setting in args.settings:
                row = run_stage3(cfg, setting, seed, args.steps, args.accelerator, args.precision)
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
                pd.DataFrame(rows).to_csv(csv, index=False)
    df = pd.DataFrame(rows)
    text = summarize(df)
    (out / "qc_summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
