"""VOC-style detection mAP, for the detection protocols (RTTS dehazing, ExDark low-light).

No detector ships with QualiTeacher (its weights cannot be bundled): run any detector on the
restored images and bring its detections, e.g. as a CSV read by `detections_from_csv` with columns
``image_id, label, score, x1, y1, x2, y2`` (pixels, corners). Ground truths come from the data
readers' `ImageRecord` boxes (`ground_truths_from_records`).

Protocol (PASCAL VOC): per class, detections of all images are ranked by score; each detection
is matched to the ground-truth box of its image and class with the highest IoU; it is a true
positive when that IoU exceeds ``iou_threshold`` and the box was not matched before by a
higher-scored detection, a false positive otherwise. Detections whose best box is marked
``difficult`` count as neither, and difficult boxes are not counted in the recall. IoU uses
continuous coordinates (``torchvision.ops.box_iou``, no "+1" pixel convention).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou

from qualiteacher.data.records import ImageRecord, format_names

AP_METHODS = ("voc2010", "voc07_11pt")
CSV_COLUMNS = ("image_id", "label", "score", "x1", "y1", "x2", "y2")


class Detections(NamedTuple):
    """Detections of one image: ``boxes`` (N, 4) x1 y1 x2 y2, ``scores`` (N,), ``labels`` N names."""

    boxes: np.ndarray | torch.Tensor
    scores: np.ndarray | torch.Tensor
    labels: Sequence[str]


class GroundTruth(NamedTuple):
    """Annotated objects of one image: ``boxes`` (M, 4), ``labels`` M names, ``difficult`` M flags."""

    boxes: np.ndarray | torch.Tensor
    labels: Sequence[str]
    difficult: Sequence[bool] | None = None


class DetectionResult(NamedTuple):
    """``ap`` per class (NaN for a class with no ground truth), ``mean_ap`` over classes with
    ground truth, ``num_gt`` (non-difficult boxes) and final ``recall`` per class."""

    ap: dict[str, float]
    mean_ap: float
    num_gt: dict[str, int]
    recall: dict[str, float]


def average_precision(recall: np.ndarray, precision: np.ndarray,
                      method: Literal["voc2010", "voc07_11pt"] = "voc2010") -> float:
    """Area under a precision-recall curve given at ranks 1..N (recall non-decreasing).

    ``"voc2010"``: area under the monotone precision envelope (all points). ``"voc07_11pt"``:
    mean over recall thresholds 0, 0.1, ..., 1 of the best precision at recall >= threshold.
    """
    recall = np.asarray(recall, dtype=np.float64).ravel()
    precision = np.asarray(precision, dtype=np.float64).ravel()
    if recall.shape != precision.shape:
        raise ValueError(f"recall and precision differ in length: {recall.size} vs {precision.size}")
    if recall.size and np.any(np.diff(recall) < 0):
        raise ValueError("recall must be non-decreasing (points ordered by decreasing score)")
    if method == "voc07_11pt":
        thresholds = np.linspace(0.0, 1.0, 11)[:, None]  # (11, 1)
        reached = recall[None, :] >= thresholds - 1e-12  # (11, N)
        best = np.where(reached, precision[None, :], 0.0).max(axis=1, initial=0.0)
        return float(np.mean(best))
    if method != "voc2010":
        raise ValueError(f"unknown AP method {method!r}; choose one of {AP_METHODS}")
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(r[1:] != r[:-1])  # recall changes between rank i and i+1
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _to_numpy(values: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _as_boxes(boxes: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.tensor(_to_numpy(boxes), dtype=torch.float32).reshape(-1, 4)
    if t.numel() and bool((t[:, 2:] < t[:, :2]).any()):
        raise ValueError(f"{what}: boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
    return t


def _match_image(det: Detections, gt: GroundTruth, iou_threshold: float, image_id: str
                 ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Per detection of one image: score, outcome (1 TP, 0 FP, -1 ignored), label; plus the gt labels."""
    d_boxes = _as_boxes(det.boxes, f"detections of {image_id!r}")
    scores = _to_numpy(det.scores).astype(np.float64).reshape(-1)
    d_labels = np.asarray(list(det.labels), dtype=object)
    if not (len(d_boxes) == len(scores) == len(d_labels)):
        raise ValueError(f"detections of {image_id!r}: {len(d_boxes)} boxes, {len(scores)} scores, {len(d_labels)} labels")
    g_boxes = _as_boxes(gt.boxes, f"ground truth of {image_id!r}")
    g_labels = np.asarray(list(gt.labels), dtype=object)
    difficult = np.zeros(len(g_labels), bool) if gt.difficult is None else np.asarray(gt.difficult, bool)
    if not (len(g_boxes) == len(g_labels) == len(difficult)):
        raise ValueError(f"ground truth of {image_id!r}: {len(g_boxes)} boxes, {len(g_labels)} labels, "
                         f"{len(difficult)} difficult flags")
    order = np.argsort(-scores, kind="stable")
    d_boxes, scores, d_labels = d_boxes[torch.as_tensor(order, dtype=torch.long)], scores[order], d_labels[order]
    outcome = np.zeros(len(scores), np.int8)
    if len(g_boxes) and len(d_boxes):
        iou = box_iou(d_boxes, g_boxes).numpy()  # (D, G)
        iou[d_labels[:, None] != g_labels[None, :]] = -1.0  # only boxes of the same class compete
        best = iou.argmax(axis=1)
        hit = iou[np.arange(len(best)), best] > iou_threshold
        ignored = hit & difficult[best]
        counted = hit & ~ignored
        # greedy by score: the first (highest-scored) detection on a box takes it, later ones are FP
        first = np.zeros(len(best), bool)
        _, first_index = np.unique(np.where(counted, best, -1), return_index=True)
        first[first_index] = True
        outcome[counted & first] = 1
        outcome[ignored] = -1
    return scores, outcome, list(d_labels), g_labels[~difficult]


def evaluate_detections(detections: Mapping[str, Detections], ground_truths: Mapping[str, GroundTruth],
                        iou_threshold: float = 0.5, classes: Sequence[str] | None = None,
                        method: Literal["voc2010", "voc07_11pt"] = "voc2010",
                        unknown_images: Literal["error", "ignore"] = "error") -> DetectionResult:
    """VOC mAP of ``detections`` against ``ground_truths`` (both keyed by image id).

    Every image of ``ground_truths`` is evaluated (one without detections only loses recall).
    ``classes`` defaults to the labels found in the ground truth; detections of other labels are
    left out. A class without (non-difficult) ground truth gets AP NaN and does not enter the mean.
    Detections on images absent from ``ground_truths`` raise unless ``unknown_images="ignore"``.
    """
    if method not in AP_METHODS:
        raise ValueError(f"unknown AP method {method!r}; choose one of {AP_METHODS}")
    unknown = sorted(set(detections) - set(ground_truths))
    if unknown and unknown_images == "error":
        raise ValueError(f"detections for {len(unknown)} image(s) without ground truth: {format_names(unknown)} "
                         "(check the image ids, or pass unknown_images='ignore')")
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0), [])
    all_scores, all_outcomes, all_labels, gt_labels = [], [], [], []
    for image_id, gt in ground_truths.items():
        s, o, lab, g = _match_image(detections.get(image_id, empty), gt, iou_threshold, image_id)
        all_scores.append(s)
        all_outcomes.append(o)
        all_labels.extend(lab)
        gt_labels.append(g)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    outcomes = np.concatenate(all_outcomes) if all_outcomes else np.zeros(0, np.int8)
    labels = np.asarray(all_labels, dtype=object)
    counted_gt = np.concatenate(gt_labels) if gt_labels else np.zeros(0, object)
    names = sorted(set(counted_gt.tolist())) if classes is None else list(classes)
    if not names:
        raise ValueError("evaluate_detections: no class to evaluate (the ground truth has no object)")
    ap, num_gt, recall = {}, {}, {}
    for name in names:
        n = int(np.sum(counted_gt == name))
        num_gt[name] = n
        keep = (labels == name) & (outcomes >= 0)
        order = np.argsort(-scores[keep], kind="stable")
        tp = np.cumsum(outcomes[keep][order] == 1)
        fp = np.cumsum(outcomes[keep][order] == 0)
        if n == 0:
            ap[name], recall[name] = float("nan"), float("nan")
            continue
        rec = tp / n
        prec = tp / np.maximum(tp + fp, 1)
        ap[name] = average_precision(rec, prec, method)
        recall[name] = float(rec[-1]) if rec.size else 0.0
    valid = [v for v in ap.values() if not np.isnan(v)]
    if not valid:
        raise ValueError(f"evaluate_detections: none of the classes {names} has a ground-truth box")
    return DetectionResult(ap, float(np.mean(valid)), num_gt, recall)


def detections_from_csv(path: str | os.PathLike) -> dict[str, Detections]:
    """Read detections from a CSV with columns ``image_id, label, score, x1, y1, x2, y2``."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "label": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"cannot read detections from {path}: {exc}") from exc
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(CSV_COLUMNS)}")
    numbers = frame[["score", "x1", "y1", "x2", "y2"]].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1) | frame["image_id"].isna() | frame["label"].isna()
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} row(s) with empty or non-numeric values, "
                         f"first at data row {int(np.flatnonzero(bad.to_numpy())[0]) + 1}")
    frame = frame.assign(**numbers)
    out = {}
    for image_id, rows in frame.groupby("image_id", sort=False):
        out[str(image_id)] = Detections(rows[["x1", "y1", "x2", "y2"]].to_numpy(np.float32),
                                        rows["score"].to_numpy(np.float64), rows["label"].tolist())
    return out


class GroundTruthSet(NamedTuple):
    """Ground truths of the annotated records, and the ids of the ``unannotated`` ones left out."""

    ground_truths: dict[str, GroundTruth]
    unannotated: tuple[str, ...]


def collect_ground_truths(records: Iterable[ImageRecord]) -> GroundTruthSet:
    """`ground_truths_from_records` that also reports the records left out (``boxes`` None: no or
    unreadable annotation file). Those images must not be scored: their objects are unknown, so
    every detection on them would wrongly count as a false positive."""
    records = list(records)
    return GroundTruthSet(ground_truths_from_records(records),
                          tuple(r.id for r in records if r.boxes is None))


def ground_truths_from_records(records: Iterable[ImageRecord]) -> dict[str, GroundTruth]:
    """Ground truths of the annotated records (``boxes`` not None), with ``meta["difficult"]`` if any.

    Records without annotation are dropped silently; `collect_ground_truths` also reports them.
    """
    out = {}
    for r in records:
        if r.boxes is None:
            continue
        difficult = r.meta.get("difficult") or None
        out[r.id] = GroundTruth(r.boxes, r.labels, None if difficult is None else tuple(difficult))
    return out
