"""Evaluation: full-reference metrics, NR-IQA versus level, detection mAP, reports and figures.

`figures` (matplotlib) is imported on demand: ``from qualiteacher.eval.figures import image_grid``.
"""

from qualiteacher.eval.coco_map import MapResult, detection_map
from qualiteacher.eval.detection import (
    DetectionResult,
    Detections,
    GroundTruth,
    GroundTruthSet,
    average_precision,
    collect_ground_truths,
    detections_from_csv,
    evaluate_detections,
    ground_truths_from_records,
)
from qualiteacher.eval.detector import (
    DEFAULT_CLASS_MAPS,
    Detector,
    MissingDetectorWeightsError,
    build_detector,
    coco_category_names,
    list_detectors,
    load_class_map,
    run_detector,
)
from qualiteacher.eval.fullref import psnr, ssim, to_y
from qualiteacher.eval.metrics import (
    DEFAULT_METRICS,
    EVAL_METRICS,
    OFFLINE_METRICS,
    EvalMetric,
    MetricSet,
    list_eval_metrics,
    metric_label,
    resolve_metrics,
    score_images,
)
from qualiteacher.eval.nriqa import level_spearman, score_levels, scores_frame
from qualiteacher.eval.report import build_restorers, evaluate_restorers, format_table, summary_table

__all__ = [
    "DEFAULT_CLASS_MAPS", "DetectionResult", "Detections", "Detector", "GroundTruth", "GroundTruthSet",
    "MapResult", "MissingDetectorWeightsError", "average_precision", "build_detector", "build_restorers",
    "coco_category_names", "collect_ground_truths", "detection_map", "detections_from_csv",
    "evaluate_detections", "evaluate_restorers", "format_table", "ground_truths_from_records",
    "level_spearman", "list_detectors", "load_class_map", "psnr", "run_detector", "score_levels",
    "scores_frame", "ssim", "summary_table", "to_y",
    # NR-IQA metric set (eval/metrics.py)
    "DEFAULT_METRICS", "EVAL_METRICS", "EvalMetric", "MetricSet", "OFFLINE_METRICS", "list_eval_metrics",
    "metric_label", "resolve_metrics", "score_images",
]
