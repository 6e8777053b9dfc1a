"""Evaluation stage of the pipeline and the stage-3 image grids logged to MLflow."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import pandas as pd
import torch
from torch import Tensor

from qualiteacher.tracking.runs import PipelineRuns


def _grid_rows(module: Any, x: Tensor, levels: list[int], tile: int | None, gt: Tensor | None = None,
               pl: Tensor | None = None) -> tuple[list[list[Tensor | None]], list[str]]:
    from qualiteacher.training.restore import restore

    teacher = restore(module.teacher, x, level=None, tile=tile)
    per_level = [restore(module.student, x, level=lv, tile=tile) for lv in levels]
    rows = []
    for i in range(x.shape[0]):
        rows.append([x[i], teacher[i] if pl is None else pl[i], *[o[i] for o in per_level],
                     None if gt is None else gt[i]])
    titles = ["input", "teacher" if pl is None else "teacher PL", *[f"student@{lv}" for lv in levels],
              "ground truth"]
    return rows, titles


class Stage3Visuals(L.Callback):
    """Every ``every_n_steps``: an image grid (input | best teacher PL | student at several levels)
    of the current unlabeled batch, and the pseudo-label level histogram, to the stage's run."""

    def __init__(self, runs: PipelineRuns, run_id: str, every_n_steps: int = 50,
                 levels: tuple[int, ...] = (0, 3, 5, 7), n_images: int = 2) -> None:
        self.runs, self.run_id, self.every, self.levels, self.n = runs, run_id, every_n_steps, list(levels), n_images

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.global_rank != 0 or step % self.every != 0 or "unlabeled" not in batch:
            return
        unl = batch["unlabeled"]
        x, ids = unl["lq"][: self.n], list(unl["id"][: self.n])
        if not all(i in pl_module.bank for i in ids):  # e.g. the supervised baseline keeps no bank
            return
        pls = pl_module.bank.gather(ids, device=x.device)
        # the best entry of every image is its first (entries are sorted by score)
        firsts = [int((pls[4] == i).nonzero()[0]) for i in range(len(ids))]
        rows, titles = _grid_rows(pl_module, x, self.levels, None, pl=pls[0][firsts])
        self._log_grid(rows, titles, f"grids/stage3_step{step:06d}.png")

    def _log_grid(self, rows: list, titles: list[str], name: str) -> None:
        from qualiteacher.eval.figures import image_grid

        try:
            self.runs.client.log_image(self.run_id, image_grid(rows, titles), artifact_file=name)
        except Exception as err:  # noqa: BLE001  an unwritable artifact store never ends training
            import logging

            logging.getLogger(__name__).warning("MLflow: image grid %s not logged (%s: %s)", name,
                                                type(err).__name__, str(err)[:200])


def _test_set(cfg: dict[str, Any]) -> list[tuple[str, Tensor, Tensor | None]]:
    from qualiteacher.data.io import ImageReadError, get_skip_log, read_image, to_tensor
    from qualiteacher.data.layouts import read_layout

    root = Path(cfg["data_root"]) / cfg["task"] / "test"
    layout = cfg.get("eval", {}).get("layout", "paired")
    records = read_layout(layout, root)
    limit = cfg.get("eval", {}).get("max_images")
    out = []
    for rec in records[: limit or None]:
        try:
            lq = to_tensor(read_image(rec.lq))
            gt = to_tensor(read_image(rec.gt)) if rec.gt is not None else None
        except ImageReadError as err:
            get_skip_log().record(err.path, err.reason)
            continue
        out.append((rec.id, lq, gt))
    if not out:
        raise RuntimeError(f"no readable test image in {root}")
    return out


def training_device(trainer: Mapping[str, Any]) -> torch.device:
    """The device a stage's Lightning ``trainer`` section trains on (``accelerator`` / ``devices``;
    ``auto`` or unset: CUDA, else MPS, else the CPU): the pipeline evaluates there too."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "mps" if torch.backends.mps.is_available() and not torch.cuda.is_available() else "cuda"
    if accelerator != "cuda":
        return torch.device("mps" if accelerator == "mps" else "cpu")
    devices = trainer.get("devices")
    # a list ([2, 3]) or "2,3" names device ids; a count (2, "2", "auto", -1) starts at 0
    ids = devices if isinstance(devices, (list, tuple)) else (
        [d for d in devices.split(",") if d.strip()] if isinstance(devices, str) and "," in devices else [0])
    return torch.device("cuda", int(ids[0]) if ids else 0)


def load_warmup(cfg: dict[str, Any], module: Any) -> torch.nn.Module | None:
    """The student as stage 3 received it (``stage3.model.init_from``: the fidelity stage for
    IQPIR, the warm-up for the U-Net), to show in the results what stage 3 added; ``None`` when
    that checkpoint is gone."""
    import copy

    from qualiteacher.pipeline import stage_section
    from qualiteacher.training.students import load_student_weights

    path = stage_section(cfg, "stage3")["model"].get("init_from")
    if not path or not Path(path).is_file():
        return None
    warmup = copy.deepcopy(module.student).cpu()
    load_student_weights(warmup, path)
    return warmup.eval()


def level_w_grid(student: torch.nn.Module, x: Tensor, levels: list[int], ws: list[float],
                 tile: int | None) -> tuple[list[list[Tensor | None]], list[str]]:
    """Rows: each image at each fidelity ``w`` in ``ws`` order (``eval.grid_w``; the input in the
    first column); columns: the quality levels."""
    from qualiteacher.training.restore import restore

    rows: list[list[Tensor | None]] = []
    for i in range(x.shape[0]):
        for w in ws:
            outs = [restore(student, x[i:i + 1], level=lv, tile=tile, w=w)[0] for lv in levels]
            rows.append([x[i], *outs])
    return rows, ["input", *[f"level {lv}" for lv in levels]]


def evaluate_pipeline(cfg: dict[str, Any], runs: PipelineRuns, run_id: str) -> pd.DataFrame:
    """Input vs teacher vs student at the top level on the held-out test set (fused IQA score,
    PSNR/SSIM where references exist), the score-versus-level study, grids; all logged."""
    from qualiteacher.eval.figures import image_grid, plot_score_vs_level
    from qualiteacher.eval.nriqa import level_spearman, score_levels
    from qualiteacher.eval.report import build_restorers, evaluate_restorers, format_table, summary_table
    from qualiteacher.iqa.presets import MEANINGLESS, build_ensemble, label_meaningless
    from qualiteacher.pipeline_stages import load_stage3

    ev = cfg.get("eval", {})
    device = training_device(cfg["stage3"].get("trainer") or {})
    module = load_stage3(cfg).to(device)
    hp = module.hparams
    ensemble = build_ensemble(hp.iqa_preset, task=hp.task, weights_dir=hp.iqa_weights_dir).to(device)
    tile = ev.get("tile") or int(cfg["stage3"].get("data", {}).get("crop_size", 64))
    top = int(hp.top_level)
    test = _test_set(cfg)
    out = Path(cfg["out_dir"]) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    from qualiteacher import console

    console.say(f"  [eval] restoring and scoring on {device}", "verbose")

    w = ev.get("w")  # fidelity weight of every model (None: the student's own default)
    warmup = load_warmup(cfg, module)
    restorers = build_restorers(module.student, module.teacher, levels=(top,), tile=tile, w=w,
                                warmup=None if warmup is None else warmup.to(device))
    df = label_meaningless(evaluate_restorers(restorers, test, ensemble, device=device), ensemble)
    table = label_meaningless(summary_table(df), ensemble)
    df.to_csv(out / "per_image.csv", index=False)
    table.to_csv(out / "results.csv")
    levels_df = score_levels(module.student, [lq.to(device) for _, lq, _ in test], ensemble,
                             levels=ev.get("levels", range(8)), tile=tile, ids=[i for i, _, _ in test], w=w)
    label_meaningless(levels_df, ensemble).to_csv(out / "score_vs_level.csv", index=False)
    rho = level_spearman(levels_df)
    plot_score_vs_level(levels_df, out / "score_vs_level.png",
                        title=f"{cfg['task']}: ensemble score vs requested level (Spearman {rho:.2f})")
    rows: list = []
    titles: list[str] = []
    for image_id, lq, gt in test[:3]:
        r, titles = _grid_rows(module, lq[None].to(device), list(ev.get("grid_levels", [0, 3, 5, 7])), tile,
                               gt=None if gt is None else gt[None])
        rows += r
    from qualiteacher.eval.figures import save_png

    save_png(image_grid(rows, titles), out / "test_grid.png")
    names = ["per_image.csv", "results.csv", "score_vs_level.csv", "score_vs_level.png", "test_grid.png"]
    if getattr(module.student, "has_fidelity", False):
        lq0 = torch.stack([lq for _, lq, _ in test[:2]]) if len({lq.shape for _, lq, _ in test[:2]}) == 1 else test[0][1][None]
        rows, titles = level_w_grid(module.student, lq0.to(device), list(ev.get("grid_levels", [0, 3, 5, 7])),
                                    list(ev.get("grid_w", [0.0, 0.5, 1.0])), tile)
        save_png(image_grid(rows, titles), out / "level_w_grid.png")
        names.append("level_w_grid.png")

    client = runs.client
    for name in names:
        client.log_artifact(run_id, str(out / name), artifact_path="eval")
    metrics = {f"eval/{str(r).replace('@', '_level')}/{c}": float(v) for r, row in table.iterrows()
               for c, v in row.items() if isinstance(v, (int, float)) and v == v and c not in ("images", "references")}
    metrics["eval/level_spearman"] = float(rho)
    from mlflow.entities import Metric

    batch = [Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=batch)
    client.log_batch(runs.parent_id, metrics=batch)
    brief = [c for c in ("images", "fused", "iqa_level", "psnr", "ssim") if c in table.columns]
    text = format_table(table[brief])
    warn = f"\n!!! IQA SCORES ARE {MEANINGLESS} !!!" if ensemble.meaningless else ""
    if ensemble.meaningless:
        client.set_tag(run_id, "iqa_scores", MEANINGLESS)
        client.set_tag(runs.parent_id, "iqa_scores", MEANINGLESS)
    from qualiteacher import console

    console.stage_numbers("eval", console.eval_numbers(table, rho))  # the full table: in the final summary
    if warn:
        console.say(warn, "quiet")
    console.say(f"{warn}\nResults on {len(test)} held-out {cfg['task']} test images "
                f"(student at level {top}; ensemble '{hp.iqa_preset}'):\n{text}{warn}", "verbose")
    console.say(f"Ensemble score vs requested level: Spearman ρ = {rho:.3f}" + (" (meaningless)" if warn else ""),
                "verbose")
    console.say(f"MLflow: {runs.uri} (parent run {runs.parent_id}); files in {out}", "verbose")
    return table
