"""``qualiteacher evaluate``: restore a benchmark's test split and report what the literature reports.

For every image of the split, every restorer (the unrestored input, each checkpoint's student at the
requested level, optionally its teacher, and baselines read from folders of restored images) runs
once; its output is scored by the NR-IQA metric set (`eval.metrics`) and the IQA ensemble (fused
score, as training grades pseudo-labels), by PSNR / SSIM and colour fidelity (`eval.colour`: opponent-
channel correlation, mean ΔE) where a reference exists, and, with a
detector, by detection mAP@0.5 and @[.5:.95] (`eval.coco_map`) on the same images restored and
unrestored. A bad image file is reported and skipped; the run goes on.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from qualiteacher.classical import classical_restorer
from qualiteacher.data.io import ImageReadError, get_skip_log, list_images, read_image, to_tensor, write_image
from qualiteacher.data.records import ImageRecord
from qualiteacher.eval.benchmarks import Benchmark, read_benchmark, resolve_benchmark
from qualiteacher.eval.colour import delta_e, opponent_correlation
from qualiteacher.eval.fullref import fullref_scores
from qualiteacher.eval.metrics import EVAL_METRICS, MetricSet, resolve_metrics, score_images
from qualiteacher.eval.nriqa import scores_frame
from qualiteacher.eval.report import markdown_table, summary_table
from qualiteacher.say import say
from qualiteacher.training.restore import restore

# restorer: (image (1, 3, H, W) in [0, 1], image id) -> restored image of the same shape
Restorer = Callable[[Tensor, str], Tensor]


@dataclass
class EvalResult:
    """``per_image``: one row per image and restorer; ``table``: means per restorer (plus mAP);
    ``detection``: per restorer, AP per class; ``skipped_metrics``: metric -> why it is missing;
    ``files``: what was written."""

    per_image: pd.DataFrame
    table: pd.DataFrame
    detection: pd.DataFrame | None = None
    skipped_metrics: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def checkpoint_restorers(modules: Mapping[str, Any], level: int = 7, teacher: bool = False,
                         tile: int | None = None, device: str | torch.device = "cpu",
                         w: float | None = None, max_memory: str | int | None = None) -> dict[str, Restorer]:
    """Restorers of trained stage-3 models (`load_for_inference` or `load_trained`): ``NAME``
    (student at ``level``) and, with ``teacher``, ``NAME/teacher``. A single module named ``""``
    gives ``student@LEVEL`` and ``teacher``. ``w``: fidelity weight (``None``: each model's
    default); ``tile`` and ``max_memory`` as `restore` takes them (None: automatic)."""
    out: dict[str, Restorer] = {}
    for name, module in modules.items():
        student, ema = module.student.to(device).eval(), module.teacher.to(device).eval()
        out[name or f"student@{level}"] = (
            lambda x, _id, m=student: restore(m, x, level=level, tile=tile, w=w, max_memory=max_memory))
        if teacher:
            out[f"{name}/teacher" if name else "teacher"] = (
                lambda x, _id, m=ema: restore(m, x, level=None, tile=tile, w=w, max_memory=max_memory))
    return out


def folder_restorer(folder: str | Path) -> Restorer:
    """A baseline's restorations, read from ``folder`` by image id (``<id>.<any image suffix>``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"baseline folder does not exist: {folder}")

    by_id = {p.relative_to(folder).with_suffix("").as_posix(): p for p in list_images(folder, recursive=True)}
    by_stem = {p.stem: p for p in by_id.values()}

    def read(x: Tensor, image_id: str) -> Tensor:
        path = by_id.get(image_id) or by_stem.get(Path(image_id).name)
        if path is None:
            raise ImageReadError(folder / f"{image_id}.png", "no restored image of this id in the baseline folder")
        out = to_tensor(read_image(path))[None].to(x.device)
        if out.shape != x.shape:
            raise ImageReadError(path, f"size {tuple(out.shape[-2:])} differs from the input's {tuple(x.shape[-2:])}")
        return out

    return read


CLASSICAL_PREFIX = "classical:"


def baseline_restorer(spec: str) -> Restorer:
    """A baseline of ``--baseline``: ``classical:NAME`` runs a classical restorer of the project
    (`qualiteacher.classical`: a method name, or a task name for its default) on the image; anything
    else is a folder of another method's restorations (`folder_restorer`)."""
    if not spec.startswith(CLASSICAL_PREFIX):
        return folder_restorer(spec)

    fn = classical_restorer(spec[len(CLASSICAL_PREFIX):])
    return lambda x, _id: fn(x)


def _read(rec: ImageRecord) -> tuple[Tensor, Tensor | None]:
    lq = to_tensor(read_image(rec.lq))[None]
    gt = None if rec.gt is None else to_tensor(read_image(rec.gt))[None]
    if gt is not None and gt.shape != lq.shape:
        raise ImageReadError(rec.gt, f"reference size {tuple(gt.shape[-2:])} differs from the input's {tuple(lq.shape[-2:])}")
    return lq, gt


def _progress(enabled: bool) -> Any:
    return Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


def _result(rows: list[pd.DataFrame], detections: dict[str, dict] | None, done: list[ImageRecord],
            classes: Sequence[str] | None, metrics: MetricSet) -> EvalResult:
    """The per-image rows, their summary per restorer and, with ``detections``, the mAP table."""
    per_image = pd.concat(rows, ignore_index=True)
    table = summary_table(per_image)
    det_table = None
    if detections is not None:
        det_table = _detection_table(detections, done, classes)
        table = table.join(det_table[["map_50", "map"]])
    return EvalResult(per_image, table, det_table, dict(metrics.skipped))


def _add_reference_scores(frame: pd.DataFrame, batch: Tensor, gt: Tensor, image_id: str) -> None:
    """PSNR, SSIM, colour correlation and ΔE of ``batch`` (R, 3, H, W) against ``gt`` (1, 3, H, W),
    as columns of ``frame``; NaN with a ``note`` where PSNR / SSIM cannot judge the image (e.g.
    under 11 px)."""
    gt_batch = gt.expand_as(batch)
    full = fullref_scores(batch, gt_batch)
    frame["psnr"], frame["ssim"], frame["note"] = full.psnr.numpy(), full.ssim.numpy(), full.note
    frame["colour_corr"] = opponent_correlation(batch, gt_batch).cpu().numpy()
    frame["delta_e"] = delta_e(batch, gt_batch).cpu().numpy()
    if full.note:
        say(f"[eval] {image_id}: {full.note}")


def evaluate(restorers: Mapping[str, Restorer], records: Sequence[ImageRecord], metrics: MetricSet,
             ensemble: torch.nn.Module | None = None, detector: Callable | None = None,
             class_map: Mapping[str, str] | None = None, classes: Sequence[str] | None = None,
             device: str | torch.device = "cpu", save_images: str | Path | None = None,
             progress: bool = True) -> EvalResult:
    """Run every restorer on every record and score the outputs (see the module docstring).

    The outputs of all restorers for one image are scored together (one call per metric). With a
    ``detector``, ``class_map`` (COCO name -> data-set class) and ``classes`` are required and the
    records' boxes are the ground truth (records without annotation are left out of mAP).
    """
    if not restorers:
        raise ValueError("evaluate: no restorer given")
    if detector is not None and (class_map is None or not classes):
        raise ValueError("evaluate: a detector needs a class map and the data set's classes")
    if detector is not None:
        from qualiteacher.eval.detector import run_detector  # lazy: torchvision (1 s), for --detector only
    device = torch.device(device)
    for module in (*metrics.modules.values(), ensemble):
        if module is not None:
            module.to(device)
    log = get_skip_log()
    rows: list[pd.DataFrame] = []
    detections: dict[str, dict] = {name: {} for name in restorers}
    done: list[ImageRecord] = []
    with _progress(progress) as bar:
        task = bar.add_task("eval", total=len(records))
        for rec in records:
            bar.advance(task)
            try:
                lq, gt = _read(rec)
                lq = lq.to(device)
                with torch.no_grad():
                    outputs = {name: fn(lq, rec.id).float().clamp(0, 1) for name, fn in restorers.items()}
                batch = torch.cat(list(outputs.values()))  # (R, 3, H, W): one call per metric
                frame = score_images(metrics, batch)
                if ensemble is not None:
                    with torch.no_grad():
                        frame = pd.concat([scores_frame(ensemble(batch)), frame], axis=1)
            except ImageReadError as err:
                log.record(err.path, err.reason)
                continue
            except (RuntimeError, ValueError, MemoryError) as err:  # one image never ends the run
                log.record(rec.lq, f"failed to restore or score: {type(err).__name__}: {str(err)[:200]}")
                continue
            done.append(rec)
            frame.insert(0, "restorer", list(outputs))
            frame.insert(0, "id", rec.id)
            if gt is not None:
                _add_reference_scores(frame, batch, gt.to(device), rec.id)
            rows.append(frame)
            for name, out in outputs.items():
                if detector is not None:
                    detections[name].update(run_detector(detector, [(rec.id, out[0])], class_map, device=device))
                if save_images is not None:
                    write_image(Path(save_images) / name.replace("/", "_").replace("@", "_level") / f"{rec.id}.png",
                                out[0].cpu())
    if not rows:
        raise ValueError(f"evaluate: none of the {len(records)} image(s) could be read ({log.summary()})")
    return _result(rows, detections if detector is not None else None, done, classes, metrics)


def _detection_table(detections: Mapping[str, dict], records: Sequence[ImageRecord],
                     classes: Sequence[str]) -> pd.DataFrame:
    # lazy: mAP needs torchmetrics and torchvision (3 s); only evaluations with a detector
    from qualiteacher.eval.coco_map import detection_map
    from qualiteacher.eval.detection import collect_ground_truths  # lazy: see the import above (torchvision)

    truths = collect_ground_truths(records)
    if truths.unannotated:
        say(f"[eval] {len(truths.unannotated)} image(s) without annotation left out of mAP")
    rows = {}
    for name, dets in detections.items():
        result = detection_map(dets, truths.ground_truths, classes)
        rows[name] = {"map_50": result.map_50, "map": result.map, "map_75": result.map_75,
                      **{f"ap50/{c}": v for c, v in result.per_class_50.items()}}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("restorer")


def write_results(result: EvalResult, out: str | Path, title: str = "") -> list[Path]:
    """``per_image.csv``, ``results.csv``, ``results.md`` (and ``detection.csv``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "per_image.csv", out / "results.csv", out / "results.md"]
    result.per_image.to_csv(files[0], index=False)
    result.table.to_csv(files[1])
    text = (f"# {title}\n\n" if title else "") + markdown_table(report_columns(result.table)) + "\n"
    if result.skipped_metrics:
        text += "\nMetrics not computed:\n" + "".join(f"- {k}: {v}\n" for k, v in result.skipped_metrics.items())
    files[2].write_text(text)
    if result.detection is not None:
        files.append(out / "detection.csv")
        result.detection.to_csv(files[-1])
    result.files = files
    return files


def report_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a paper's table shows: images, every NR-IQA metric, fused, PSNR, SSIM, colour, mAP."""
    keep = [c for c in ("images",) if c in table.columns]
    keep += [c for c in table.columns if c in EVAL_METRICS]
    keep += [c for c in ("fused", "psnr", "ssim", "colour_corr", "delta_e", "map_50", "map") if c in table.columns]
    return table[keep].dropna(axis=1, how="all")


def log_to_mlflow(result: EvalResult, prefix: str = "eval") -> bool:
    """Log the table's means and the result files to the active MLflow run; False without one."""
    import mlflow  # lazy: mlflow takes 1.5 s to import; only a tracked evaluation logs

    if mlflow.active_run() is None:
        return False
    metrics = {}
    for restorer, row in result.table.iterrows():
        key = str(restorer).replace("@", "_level")
        for column, value in row.items():
            if isinstance(value, (int, float)) and not math.isnan(value):
                metrics[f"{prefix}/{key}/{column}"] = float(value)
    mlflow.log_metrics(metrics, step=0, timestamp=int(time.time() * 1000))
    for path in result.files:
        mlflow.log_artifact(str(path), artifact_path=prefix)
    return True


def benchmark_records(task: str, data: str | Path, benchmark: str = "auto", split: str | None = None,
                      limit: int | None = None) -> tuple[Benchmark, list[ImageRecord]]:
    """The benchmark chosen for ``task`` / ``data`` and its records (see `eval.benchmarks`)."""
    bench = resolve_benchmark(benchmark, task, data)
    return bench, read_benchmark(bench, task, data, split=split, limit=limit)


def build_metric_set(names: Sequence[str] | None) -> MetricSet:
    """`resolve_metrics`, with ``["auto"]`` / ``None`` meaning whatever is available."""
    return resolve_metrics(None if not names or list(names) == ["auto"] else list(names))
