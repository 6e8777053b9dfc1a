"""COCO-style detection mAP (@0.5, @0.75, @[.5:.95]) computed by torchmetrics with pycocotools.

The protocol of the detection benchmarks (RTTS dehazing, ExDark low light): one detector, the same
images unrestored and restored, mAP of each against the data set's boxes. This module turns our
`Detections` / `GroundTruth` (class names, keyed by image id) into torchmetrics' inputs and its
output into a `MapResult`. The VOC implementation in `detection.py` stays for VOC-style numbers.

Precision is interpolated at COCO's 101 recall points (0, 0.01, ..., 1) and at most
``max_detections`` detections per image (highest scores) are scored, as in pycocotools.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from qualiteacher.data.records import format_names
from qualiteacher.eval.detection import Detections, GroundTruth

log = logging.getLogger(__name__)


class MapResult(NamedTuple):
    """Detection mAP of one run over a data set.

    Attributes:
        map_50: mAP at IoU 0.5 over the classes with ground truth.
        map: mAP averaged over IoU 0.5, 0.55, ..., 0.95 (the COCO primary metric).
        map_75: mAP at IoU 0.75.
        per_class: AP@[.5:.95] per class of ``classes`` (NaN for a class without ground truth).
        per_class_50: AP@0.5 per class (NaN for a class without ground truth).
        num_images: images scored (those of ``ground_truths``, empty ones included).
        num_gt: counted (non-difficult) ground-truth boxes per class.
        images_without_gt: images that had detections but no ground truth; left out.
        dropped_detections: detections whose label is not one of ``classes``; left out.
    """

    map_50: float
    map: float
    map_75: float
    per_class: dict[str, float]
    per_class_50: dict[str, float]
    num_images: int
    num_gt: dict[str, int]
    images_without_gt: int
    dropped_detections: int


def _as_tensor(values: np.ndarray | torch.Tensor | Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def _label_ids(labels: Sequence[str], index: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ids of the labels in ``index`` and the mask of those kept."""
    keep = torch.tensor([name in index for name in labels], dtype=torch.bool)
    ids = torch.tensor([index[name] for name in labels if name in index], dtype=torch.long)
    return ids, keep


def _target(image_id: str, gt: GroundTruth, index: Mapping[str, int]) -> tuple[dict[str, torch.Tensor], int]:
    """torchmetrics target of one image and the number of its boxes outside ``index``."""
    boxes = _as_tensor(gt.boxes, torch.float32).reshape(-1, 4)
    labels = list(gt.labels)
    difficult = [False] * len(labels) if gt.difficult is None else [bool(d) for d in gt.difficult]
    if not (len(boxes) == len(labels) == len(difficult)):
        raise ValueError(f"ground truth of {image_id!r}: {len(boxes)} boxes, {len(labels)} labels, "
                         f"{len(difficult)} difficult flags")
    ids, keep = _label_ids(labels, index)
    crowd = torch.tensor(difficult, dtype=torch.bool)[keep].to(torch.int64)
    return {"boxes": boxes[keep], "labels": ids, "iscrowd": crowd}, int((~keep).sum())


def _prediction(image_id: str, det: Detections, index: Mapping[str, int]) -> tuple[dict[str, torch.Tensor], int]:
    """torchmetrics prediction of one image and the number of its detections outside ``index``."""
    boxes = _as_tensor(det.boxes, torch.float32).reshape(-1, 4)
    scores = _as_tensor(det.scores, torch.float32).reshape(-1)
    labels = list(det.labels)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"detections of {image_id!r}: {len(boxes)} boxes, {len(scores)} scores, "
                         f"{len(labels)} labels")
    if len(boxes) and bool((boxes[:, 2:] < boxes[:, :2]).any()):
        raise ValueError(f"detections of {image_id!r}: boxes must be x1, y1, x2, y2 with x2 >= x1, y2 >= y1")
    ids, keep = _label_ids(labels, index)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": ids}, int((~keep).sum())


def _value(x: torch.Tensor | float) -> float:
    v = float(x)
    return math.nan if v < 0 else v  # torchmetrics / pycocotools write -1 where nothing is defined


def _metric_inputs(detections: Mapping[str, Detections], ground_truths: Mapping[str, GroundTruth],
                   classes: list[str]) -> tuple[list[dict], list[dict], int, int]:
    """torchmetrics' predictions and targets, one per ground-truth image (no detections: an empty
    prediction), and the numbers of ground-truth boxes and detections whose label is not a class."""
    index = {name: i for i, name in enumerate(classes)}
    preds, targets = [], []
    dropped_gt = dropped_det = 0
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [])
    for image_id, gt in ground_truths.items():
        target, n_gt = _target(image_id, gt, index)
        pred, n_det = _prediction(image_id, detections.get(image_id, empty), index)
        targets.append(target)
        preds.append(pred)
        dropped_gt += n_gt
        dropped_det += n_det
    return preds, targets, dropped_gt, dropped_det


def _per_class(out: Mapping[str, Any], iou_thresholds: Sequence[float],
               classes: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """AP@[.5:.95] and AP@0.5 per class name from torchmetrics' extended summary (NaN: a class
    without ground truth)."""
    per_class = dict.fromkeys(classes, math.nan)
    per_class_50 = dict.fromkeys(classes, math.nan)
    observed = out["classes"].reshape(-1).tolist()  # sorted ids seen in detections or ground truth
    at_50 = int(np.flatnonzero(np.isclose(iou_thresholds, 0.5))[0])
    # precision: (IoU thresholds, recall points, classes as `observed`, area ranges, max dets); area "all"
    # is index 0, the last max-dets entry is max_detections; -1 marks a class without ground truth
    precision = out["precision"][at_50, :, :, 0, -1]
    for k, (class_id, ap) in enumerate(zip(observed, out["map_per_class"].reshape(-1).tolist())):
        name = classes[class_id]
        per_class[name] = _value(ap)
        column = precision[:, k]
        per_class_50[name] = float(column.mean()) if bool((column > -1).all()) else math.nan
    return per_class, per_class_50


def detection_map(detections: Mapping[str, Detections], ground_truths: Mapping[str, GroundTruth],
                  classes: Sequence[str], max_detections: int = 100) -> MapResult:
    """COCO mAP of ``detections`` against ``ground_truths`` (both keyed by image id, labels by name).

    Computed by ``torchmetrics.detection.MeanAveragePrecision`` (pycocotools backend, boxes
    x1 y1 x2 y2 in pixels). Class ``classes[i]`` gets id ``i``; detections and ground-truth boxes of
    other labels are left out (counted in ``dropped_detections``, ground truth logged).

    Images: every image of ``ground_truths`` is scored; one without detections only loses recall,
    one annotated with no object (0 boxes) contributes its detections as false positives.
    Detections on images absent from ``ground_truths`` are left out and counted in
    ``images_without_gt``: pass only annotated images as ground truth (records with ``boxes``
    None have unknown objects; `collect_ground_truths` leaves them out and lists them).

    Difficult boxes (``GroundTruth.difficult``, VOC/RTTS) are passed as COCO ``iscrowd``: they do
    not count in the recall and a detection matched to one is ignored, neither TP nor FP. This
    differs slightly from VOC's "difficult": pycocotools matches a detection to a non-crowd box
    first (a difficult box only catches detections no counted box takes), its overlap with a crowd
    box is intersection over the *detection's* area (so a small detection inside a large difficult
    box is ignored), and a crowd box may absorb any number of detections.

    Raises:
        ValueError: no ground truth image, or no counted ground-truth box of ``classes``.
    """
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"detection_map: classes must be non-empty and unique, got {classes}")
    if not ground_truths:
        raise ValueError("detection_map: no annotated image to score (empty split, or no annotation file "
                         "could be read; records with boxes=None are not ground truth)")
    preds, targets, dropped_gt, dropped_det = _metric_inputs(detections, ground_truths, classes)
    num_gt = {name: 0 for name in classes}
    for t in targets:
        for i in t["labels"][t["iscrowd"] == 0].tolist():
            num_gt[classes[i]] += 1
    if not any(num_gt.values()):
        raise ValueError(f"detection_map: no ground-truth box of {', '.join(classes)} (besides difficult ones) "
                         f"in {len(ground_truths)} image(s); check the class names and the annotation files")
    unknown = sorted(set(detections) - set(ground_truths))
    if unknown:
        log.warning("detection_map: detections on %d image(s) without ground truth left out: %s",
                    len(unknown), format_names(unknown))
    if dropped_gt:
        log.warning("detection_map: %d ground-truth box(es) with a label outside %s left out",
                    dropped_gt, ", ".join(classes))
    if dropped_det:
        log.info("detection_map: %d detection(s) with a label outside the classes left out", dropped_det)

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, extended_summary=True,
                                  max_detection_thresholds=[1, 10, max_detections], backend="pycocotools")
    metric.warn_on_many_detections = False  # max_detections is the documented cut
    metric.update(preds, targets)
    out = metric.compute()

    per_class, per_class_50 = _per_class(out, metric.iou_thresholds, classes)
    return MapResult(
        map_50=_value(out["map_50"]), map=_value(out["map"]), map_75=_value(out["map_75"]),
        per_class=per_class, per_class_50=per_class_50, num_images=len(ground_truths), num_gt=num_gt,
        images_without_gt=len(unknown), dropped_detections=dropped_det,
    )
