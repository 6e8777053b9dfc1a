"""The evaluation stage: input vs the task's classical restorer vs teacher vs warm-up vs student on
the held-out test split (PSNR / SSIM / colour against the ground truth, IQA scores), the
score-versus-level study and image grids, logged to the eval run and its parent."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from torch import Tensor

from qualiteacher import console
from qualiteacher.classical import classical_restorer
from qualiteacher.data.io import ImageReadError, get_skip_log, read_image, to_tensor
from qualiteacher.data.layouts import read_layout
from qualiteacher.devices import best_device_type, gpu_type
from qualiteacher.eval import report
from qualiteacher.eval.figures import image_grid, plot_score_vs_level, save_png
from qualiteacher.eval.nriqa import level_spearman, score_levels
from qualiteacher.eval.report import build_restorers, format_table, summary_table
from qualiteacher.iqa import presets
from qualiteacher.iqa.presets import MEANINGLESS, label_meaningless
from qualiteacher.pipeline.config import EvalSettings
from qualiteacher.pipeline.grids import grid_rows, level_w_grid
from qualiteacher.pipeline.sections import StagePlan
from qualiteacher.tracking.runs import PipelineRuns
from qualiteacher.training.stage3 import load_trained
from qualiteacher.training.students import load_student_weights

# The ensemble builder and the restorers' evaluation are called through their modules
# (``presets.build_ensemble``, ``report.evaluate_restorers``): tests replace them there.


def read_test_set(folder: Path, layout: str = "paired",
                  limit: int | None = None) -> list[tuple[str, Tensor, Tensor | None]]:
    """``(id, lq, gt or None)`` of the first ``limit`` readable images of a test folder; unreadable
    files go to the skip log."""
    out = []
    for rec in read_layout(layout, folder)[: limit or None]:
        try:
            lq = to_tensor(read_image(rec.lq))
            gt = to_tensor(read_image(rec.gt)) if rec.gt is not None else None
        except ImageReadError as err:
            get_skip_log().record(err.path, err.reason)
            continue
        out.append((rec.id, lq, gt))
    if not out:
        raise RuntimeError(f"no readable test image in {folder}")
    return out


def training_device(trainer: Mapping[str, Any]) -> torch.device:
    """The device a stage's Lightning ``trainer`` section trains on (``accelerator`` / ``devices``;
    ``auto`` or unset: CUDA, else MPS, else the CPU): the pipeline evaluates there too."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator == "auto":
        accelerator = best_device_type()
    if accelerator == "gpu":
        accelerator = gpu_type() or "cuda"  # no GPU: the check of the section has said so already
    if accelerator != "cuda":
        return torch.device("mps" if accelerator == "mps" else "cpu")
    devices = trainer.get("devices")
    # a list ([2, 3]) or "2,3" names device ids; a count (2, "2", "auto", -1) starts at 0
    ids = devices if isinstance(devices, (list, tuple)) else (
        [d for d in devices.split(",") if d.strip()] if isinstance(devices, str) and "," in devices else [0])
    return torch.device("cuda", int(ids[0]) if ids else 0)


def load_warmup(init_from: str | None, module: Any) -> torch.nn.Module | None:
    """The student as stage 3 received it (``stage3.model.init_from``: the fidelity stage for
    IQPIR, the warm-up for the U-Net), to show in the results what stage 3 added; ``None`` when
    that checkpoint is gone."""
    if not init_from or not Path(init_from).is_file():
        return None
    warmup = copy.deepcopy(module.student).cpu()
    load_student_weights(warmup, init_from)
    return warmup.eval()


CLEAN_PREFIX = "clean:"
UNSEEN_PREFIX = "unseen:"


def clean_rows(restorers: Mapping[str, Any], test: list, ensemble: Any, device: torch.device,
               prefix: str = CLEAN_PREFIX) -> pd.DataFrame:
    """Do no harm: every restorer but ``input`` given the test split's *ground truth* as input and
    scored against it (rows ``clean:NAME``); a restorer that leaves a clean photo as it is scores a
    high PSNR / SSIM here. Empty when the test split has no references."""
    clean = [(i, gt, gt) for i, _, gt in test if gt is not None]
    chosen = {f"{prefix}{name}": fn for name, fn in restorers.items() if name != "input"}
    if not clean or not chosen:
        return pd.DataFrame()
    return report.evaluate_restorers(chosen, clean, ensemble, device=device)


def unseen_pairs(task_data: Path, settings: EvalSettings) -> list:
    """The pairs of the second real-domain folder ``task_data / settings.unseen`` (the demo data's
    ``unseen``); empty when ``settings.unseen`` is None, names the measured split itself, or the
    folder is missing."""
    if settings.unseen is None or settings.unseen == settings.split or not (task_data / settings.unseen).is_dir():
        return []
    return read_test_set(task_data / settings.unseen, settings.layout, settings.max_images)


def unseen_rows(restorers: Mapping[str, Any], pairs: list, ensemble: Any, device: torch.device) -> pd.DataFrame:
    """The same restorers on :func:`unseen_pairs`, photos no split is cut from: rows
    ``unseen:NAME``, and ``unseen-clean:NAME`` with each image's ground truth as input. The test
    split has 8 images of 2 photos; this asks the same question on new photos without being test."""
    if not pairs:
        return pd.DataFrame()
    rows = report.evaluate_restorers({f"{UNSEEN_PREFIX}{n}": fn for n, fn in restorers.items()}, pairs, ensemble,
                                     device=device)
    return pd.concat([rows, clean_rows(restorers, pairs, ensemble, device, prefix="unseen-clean:")], ignore_index=True)


def write_grids(module: Any, test: list, settings: EvalSettings, tile: int, classical: Any, out: Path,
                device: torch.device, unseen: list = ()) -> list[str]:
    """The eval's image grids in ``out``: ``test_grid.png`` (the first 3 test images: input,
    classical, the grid levels, ground truth), ``unseen_grid.png`` the same for 3 unseen images
    spread over the folder (when given) and, for a student with the fidelity path,
    ``level_w_grid.png`` (level x w). Returns their file names."""
    names = []
    picks = {"test_grid.png": test[:3], "unseen_grid.png": [unseen[i * len(unseen) // 3] for i in range(3)]
             if len(unseen) >= 3 else list(unseen)}
    for name, chosen in picks.items():
        if not chosen:
            continue
        rows: list = []
        titles: list[str] = []
        for _, lq, gt in chosen:
            r, titles = grid_rows(module, lq[None].to(device), list(settings.grid_levels), tile,
                                  gt=None if gt is None else gt[None], classical=classical)
            rows += r
        save_png(image_grid(rows, titles), out / name)
        names.append(name)
    if getattr(module.student, "has_fidelity", False):
        lq0 = torch.stack([lq for _, lq, _ in test[:2]]) if len({lq.shape for _, lq, _ in test[:2]}) == 1 else test[0][1][None]
        rows, titles = level_w_grid(module.student, lq0.to(device), list(settings.grid_levels),
                                    list(settings.grid_w), tile)
        save_png(image_grid(rows, titles), out / "level_w_grid.png")
        names.append("level_w_grid.png")
    return names


def evaluate_pipeline(task: str, settings: EvalSettings, stage3: StagePlan, test_folder: Path, out: Path,
                      runs: PipelineRuns, run_id: str) -> pd.DataFrame:
    """Input vs the task's classical restorer (`classical.DEFAULT_CLASSICAL`, row ``classical``) vs
    teacher vs student at the top level of ``stage3.final`` on ``task``'s test split in ``test_folder``
    (fused IQA score; PSNR / SSIM / colour where references exist), the score-versus-level study,
    grids; files in ``out``, all logged to ``run_id`` (metrics also to the parent run)."""
    from mlflow.entities import Metric  # lazy: MLflow loads when a run is tracked

    device = training_device(stage3.section.get("trainer") or {})
    module = load_trained(stage3.final).to(device)
    hp = module.hparams
    ensemble = presets.build_ensemble(hp.iqa_preset, task=hp.task, weights_dir=hp.iqa_weights_dir).to(device)
    tile = settings.tile or int(stage3.args.data.crop_size)
    top = int(hp.top_level)
    test = read_test_set(test_folder, settings.layout, settings.max_images)
    out.mkdir(parents=True, exist_ok=True)
    console.say(f"  [eval] restoring and scoring on {device}", "verbose")

    w = settings.w  # fidelity weight of every model (None: the student's own default)
    warmup = load_warmup(stage3.args.model.init_from, module)
    restorers = build_restorers(module.student, module.teacher, levels=(top,), tile=tile, w=w,
                                warmup=None if warmup is None else warmup.to(device))
    classical = classical_restorer(task)  # what a user tries first, with no training
    restorers = {"input": restorers.pop("input"), "classical": classical, **restorers}
    df = report.evaluate_restorers(restorers, test, ensemble, device=device)
    new = unseen_pairs(test_folder.parent, settings)
    unseen = unseen_rows(restorers, new, ensemble, device)
    df = label_meaningless(pd.concat([df, clean_rows(restorers, test, ensemble, device), unseen], ignore_index=True),
                           ensemble)
    table = label_meaningless(summary_table(df), ensemble)
    df.to_csv(out / "per_image.csv", index=False)
    table.to_csv(out / "results.csv")
    levels_df = score_levels(module.student, [lq.to(device) for _, lq, _ in test], ensemble,
                             levels=list(settings.levels), tile=tile, ids=[i for i, _, _ in test], w=w)
    label_meaningless(levels_df, ensemble).to_csv(out / "score_vs_level.csv", index=False)
    rho = level_spearman(levels_df)
    plot_score_vs_level(levels_df, out / "score_vs_level.png",
                        title=f"{task}: ensemble score vs requested level (Spearman {rho:.2f})")
    grids = write_grids(module, test, settings, tile, classical, out, device, unseen=new)
    names = ["per_image.csv", "results.csv", "score_vs_level.csv", "score_vs_level.png", *grids]
    client = runs.client
    for name in names:
        client.log_artifact(run_id, str(out / name), artifact_path="eval")
    metrics = {f"eval/{str(r).replace('@', '_level').replace(':', '/')}/{c}": float(v) for r, row in table.iterrows()
               for c, v in row.items() if isinstance(v, (int, float)) and v == v and c not in ("images", "references")}
    metrics["eval/level_spearman"] = float(rho)
    batch = [Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=batch)
    client.log_batch(runs.parent_id, metrics=batch)
    if ensemble.meaningless:
        client.set_tag(run_id, "iqa_scores", MEANINGLESS)
        client.set_tag(runs.parent_id, "iqa_scores", MEANINGLESS)
    report_eval(table, rho, ensemble.meaningless, f"{len(test)} held-out {task} test images (student at level "
                f"{top}; ensemble '{hp.iqa_preset}')", f"MLflow: {runs.uri} (parent run {runs.parent_id}); files in {out}")
    return table


def report_eval(table: pd.DataFrame, rho: float, meaningless: bool, what: str, where: str) -> None:
    """The eval's console lines: its numbers for the stage line (the full table goes to the final
    summary), a warning when the IQA scores are meaningless, and in verbose mode the table."""
    brief = [c for c in ("images", "fused", "iqa_level", "psnr", "ssim", "colour_corr", "delta_e") if c in table.columns]
    text = format_table(table[brief])
    warn = f"\n!!! IQA SCORES ARE {MEANINGLESS} !!!" if meaningless else ""
    console.stage_numbers("eval", console.eval_numbers(table, rho))
    if warn:
        console.say(warn, "quiet")
    console.say(f"{warn}\nResults on {what}:\n{text}{warn}", "verbose")
    console.say(f"Ensemble score vs requested level: Spearman ρ = {rho:.3f}" + (" (meaningless)" if warn else ""),
                "verbose")
    console.say(where, "verbose")
