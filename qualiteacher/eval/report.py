"""Evaluate several restorers on a test set: NR-IQA scores always, PSNR / SSIM where a reference exists.

A restorer is any function ``(B, 3, H, W) -> (B, 3, H, W)`` in [0, 1]: the identity ("input"), the
teacher, the student at a level (`build_restorers` makes these from models), or an external method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from qualiteacher import tables
from qualiteacher.data.io import read_image, to_tensor
from qualiteacher.data.records import ImageRecord
from qualiteacher.eval.colour import delta_e, opponent_correlation
from qualiteacher.eval.fullref import fullref_scores
from qualiteacher.eval.metrics import EVAL_METRICS
from qualiteacher.eval.nriqa import scores_frame
from qualiteacher.training.restore import restore

Restorer = Callable[[Tensor], Tensor]


def identity(images: Tensor) -> Tensor:
    """The "input" restorer: returns its batch unchanged."""
    return images


def build_restorers(student: nn.Module | None = None, teacher: nn.Module | None = None,
                    levels: Sequence[int] = (7,), tile: int | None = None,
                    include_input: bool = True, w: float | None = None,
                    warmup: nn.Module | None = None) -> dict[str, Restorer]:
    """``{"input", "warmup", "teacher", "student@<level>", ...}`` restorers built with `restore`
    (tiling optional; ``w`` the fidelity weight of every model, ``None``: each model's default).
    ``warmup`` is the student before stage 3 (unconditioned), to show what stage 3 added."""
    restorers: dict[str, Restorer] = {"input": identity} if include_input else {}
    if warmup is not None:
        restorers["warmup"] = lambda x: restore(warmup, x, level=None, tile=tile, w=w)
    if teacher is not None:
        restorers["teacher"] = lambda x: restore(teacher, x, level=None, tile=tile, w=w)
    if student is not None:
        for level in levels:
            restorers[f"student@{level}"] = lambda x, lv=int(level): restore(student, x, level=lv, tile=tile, w=w)
    return restorers


def _as_batch(image: Tensor, what: str) -> Tensor:
    batch = image.unsqueeze(0) if image.ndim == 3 else image
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"{what}: expected a (3, H, W) or (B, 3, H, W) image, got {tuple(image.shape)}")
    return batch


def iter_batches(source: Iterable[Any]) -> Iterator[tuple[list[str], Tensor, Tensor | None]]:
    """Normalise a test set to ``(ids, lq (B,3,H,W), gt (B,3,H,W) or None)`` batches.

    ``source`` yields ``(id, lq, gt_or_None)`` tuples of tensors, `ImageRecord` items (read from
    disk), or dicts ``{"lq", "gt" (optional), "id"}`` as the validation DataLoader serves them.
    """
    for item in source:
        if isinstance(item, ImageRecord):
            lq = to_tensor(read_image(item.lq)).unsqueeze(0)
            gt = None if item.gt is None else to_tensor(read_image(item.gt)).unsqueeze(0)
            yield [item.id], lq, gt
        elif isinstance(item, Mapping):
            if "lq" not in item or "id" not in item:
                raise KeyError(f"test batch needs keys 'lq' and 'id', got {sorted(item)}")
            ids = [item["id"]] if isinstance(item["id"], str) else [str(i) for i in item["id"]]
            lq = _as_batch(item["lq"], f"batch {ids[:3]}")
            gt = item.get("gt")
            yield ids, lq, None if gt is None else _as_batch(gt, f"gt of batch {ids[:3]}")
        elif isinstance(item, tuple) and len(item) == 3:
            image_id, lq, gt = item
            lq = _as_batch(lq, f"image {image_id!r}")
            yield [str(image_id)], lq, None if gt is None else _as_batch(gt, f"gt of image {image_id!r}")
        else:
            raise TypeError(f"test items must be (id, lq, gt) tuples, ImageRecord or dicts, got {type(item).__name__}")


def evaluate_restorers(restorers: Mapping[str, Restorer], loader_or_records: Iterable[Any],
                       ensemble: Callable[[Tensor], Any], device: torch.device | str = "cpu",
                       border: int = 0, y_channel: bool = False) -> pd.DataFrame:
    """Run every restorer on every test image and score the outputs.

    ``loader_or_records`` is anything `iter_batches` reads. Each restorer gets the whole batch on
    ``device``; its output is clamped to [0, 1] (as when saved to 8 bits). The outputs of all
    restorers for a batch are scored in one ensemble call (an ``nn.Module`` ensemble is moved to
    ``device``). Returns one row per image and restorer: ``id``, ``restorer``, the `scores_frame`
    columns, ``psnr`` / ``ssim`` (``border`` / ``y_channel`` as in `psnr`) and the colour measures
    ``colour_corr`` / ``delta_e`` (`eval.colour`), all NaN without a reference.
    """
    if not restorers:
        raise ValueError("evaluate_restorers: no restorer given")
    device = torch.device(device)
    if isinstance(ensemble, nn.Module):
        ensemble.to(device)
    frames = []
    for ids, lq, gt in iter_batches(loader_or_records):
        lq = lq.to(device, torch.float32)
        gt = None if gt is None else gt.to(device, torch.float32)
        if gt is not None and gt.shape != lq.shape:
            raise ValueError(f"images {ids[:3]}: input {tuple(lq.shape)} and reference {tuple(gt.shape)} differ in size")
        outputs: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, fn in restorers.items():
                out = fn(lq)
                if out.shape != lq.shape:
                    raise ValueError(f"restorer {name!r} on {ids[:3]}: returned {tuple(out.shape)} for input {tuple(lq.shape)}")
                outputs[name] = out.float().clamp(0, 1)
            scores = scores_frame(ensemble(torch.cat(list(outputs.values()))))  # (R*B) rows, restorer-major
        b = lq.shape[0]
        for k, (name, out) in enumerate(outputs.items()):
            frame = scores.iloc[k * b:(k + 1) * b].reset_index(drop=True)
            frame.insert(0, "restorer", name)
            frame.insert(0, "id", ids)
            if gt is None:
                frame["psnr"] = frame["ssim"] = frame["colour_corr"] = frame["delta_e"] = np.nan
            else:  # NaN where PSNR / SSIM cannot judge the image (e.g. SSIM under 11 px)
                full = fullref_scores(out, gt, border, y_channel)
                frame["psnr"], frame["ssim"] = full.psnr.numpy(), full.ssim.numpy()
                frame["colour_corr"] = opponent_correlation(out, gt).cpu().numpy()
                frame["delta_e"] = delta_e(out, gt).cpu().numpy()
            frames.append(frame)
    if not frames:
        raise ValueError("evaluate_restorers: the test set is empty")
    return pd.concat(frames, ignore_index=True)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of every numeric column per restorer (in order of first appearance), plus ``images`` and
    ``references`` (how many images had a reference, the count behind PSNR / SSIM)."""
    if "restorer" not in df.columns:
        raise KeyError(f"summary_table: column 'restorer' missing (have {list(df.columns)})")
    numeric = df.select_dtypes("number").columns.tolist()
    grouped = df.groupby("restorer", sort=False)
    table = grouped[numeric].mean()
    table.insert(0, "images", grouped.size())
    if "psnr" in df.columns:
        table.insert(1, "references", grouped["psnr"].count())
    return table


def format_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A fixed-width text table of ``df`` (e.g. `summary_table`'s) for the terminal.

    Columns that are NaN throughout (PSNR / SSIM on a set with no reference) are left out.
    """
    shown = df.dropna(axis=1, how="all")
    return shown.to_string(float_format=lambda v: f"{v:.{digits}f}")


HIGHER_BETTER = {"fused": True, "psnr": True, "ssim": True, "colour_corr": True, "delta_e": False,
                 "map_50": True, "map": True, "map_75": True}
COLUMN_LABELS = {"images": "images", "fused": "fused", "psnr": "PSNR", "ssim": "SSIM", "colour_corr": "colour corr",
                 "delta_e": "ΔE76", "map_50": "mAP@0.5", "map": "mAP@[.5:.95]", "map_75": "mAP@0.75"}


def column_direction(column: str) -> bool | None:
    """True when higher is better, False when lower is, None when the column is not a score."""
    if column in EVAL_METRICS:
        return EVAL_METRICS[column].higher_better
    return HIGHER_BETTER.get(column)


def markdown_table(df: pd.DataFrame, digits: int = 4, bold_best: bool = True) -> str:
    """A Markdown table like a paper's: one row per restorer, headers with ↑ / ↓, the best value of
    every score column (among the rows, input included) in bold. NaN shows as "–"."""
    headers, best = {}, {}
    for column in df.columns:
        direction = column_direction(column)
        label = EVAL_METRICS[column].label if column in EVAL_METRICS else COLUMN_LABELS.get(column, column)
        headers[column] = label if direction is None else f"{label} {'↑' if direction else '↓'}"
        if bold_best and direction is not None:
            best[column] = direction
    return tables.markdown_table(df, digits, headers, best)


def comparison_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Several results tables (``results.csv`` of several evaluations) side by side: one row per
    restorer, prefixed ``LABEL/`` when two tables share a restorer name; columns are the union."""
    if not tables:
        raise ValueError("comparison_table: no table given")
    names = [str(r) for t in tables.values() for r in t.index]
    clash = {n for n in names if names.count(n) > 1}
    parts = []
    for label, table in tables.items():
        renamed = table.rename(index=lambda r, lb=label: f"{lb}/{r}" if str(r) in clash else str(r))
        parts.append(renamed)
    out = pd.concat(parts, axis=0, sort=False)
    out.index.name = "restorer"
    return out
