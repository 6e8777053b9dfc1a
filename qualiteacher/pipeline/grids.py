"""Image grids of a stage-3 student: during training (to the stage's MLflow run) and in evaluation."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from qualiteacher.eval.figures import image_grid
from qualiteacher.tracking.runs import PipelineRuns
from qualiteacher.training.restore import restore


def grid_rows(module: Any, x: Tensor, levels: list[int], tile: int | None, gt: Tensor | None = None,
              pl: Tensor | None = None, classical: Callable[[Tensor], Tensor] | None = None
              ) -> tuple[list[list[Tensor | None]], list[str]]:
    """Rows: each image as input | teacher (or its pseudo-label ``pl``) | student at ``levels`` |
    the ``classical`` restorer's output, beside the student (when given) | ground truth."""
    teacher = restore(module.teacher, x, level=None, tile=tile)
    per_level = [restore(module.student, x, level=lv, tile=tile) for lv in levels]
    baseline = None if classical is None else classical(x).clamp(0, 1)
    rows = []
    for i in range(x.shape[0]):
        rows.append([x[i], teacher[i] if pl is None else pl[i], *[o[i] for o in per_level],
                     *([] if baseline is None else [baseline[i]]), None if gt is None else gt[i]])
    titles = ["input", "teacher" if pl is None else "teacher PL", *[f"student@{lv}" for lv in levels],
              *([] if classical is None else ["classical"]), "ground truth"]
    return rows, titles


def level_w_grid(student: torch.nn.Module, x: Tensor, levels: list[int], ws: list[float],
                 tile: int | None) -> tuple[list[list[Tensor | None]], list[str]]:
    """Rows: each image at each fidelity ``w`` in ``ws`` order (``eval.grid_w``; the input in the
    first column); columns: the quality levels."""
    rows: list[list[Tensor | None]] = []
    for i in range(x.shape[0]):
        for w in ws:
            outs = [restore(student, x[i:i + 1], level=lv, tile=tile, w=w)[0] for lv in levels]
            rows.append([x[i], *outs])
    return rows, ["input", *[f"level {lv}" for lv in levels]]


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
        rows, titles = grid_rows(pl_module, x, self.levels, None, pl=pls[0][firsts])
        self._log_grid(rows, titles, f"grids/stage3_step{step:06d}.png")

    def _log_grid(self, rows: list, titles: list[str], name: str) -> None:
        try:
            self.runs.client.log_image(self.run_id, image_grid(rows, titles), artifact_file=name)
        except Exception as err:  # noqa: BLE001  an unwritable artifact store never ends training
            logging.getLogger(__name__).warning("MLflow: image grid %s not logged (%s: %s)", name,
                                                type(err).__name__, str(err)[:200])
