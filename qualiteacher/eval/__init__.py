"""Evaluation: full-reference metrics, NR-IQA versus level, detection mAP, reports and figures.

`figures` (matplotlib) is imported on demand: ``from qualiteacher.eval.figures import image_grid``.
"""

from qualiteacher.eval.detection import (
    DetectionResult,
    Detections,
    GroundTruth,
    average_precision,
    detections_from_csv,
    evaluate_detections,
    ground_truths_from_records,
)
from qualiteacher.eval.fullref import psnr, ssim, to_y
from qualiteacher.eval.nriqa import level_spearman, score_levels, scores_frame
from qualiteacher.eval.report import build_restorers, evaluate_restorers, format_table, summary_table

__all__ = [
    "DetectionResult", "Detections", "GroundTruth", "average_precision", "build_restorers",
    "detections_from_csv", "evaluate_detections", "evaluate_restorers", "format_table",
    "ground_truths_from_records", "level_spearman", "psnr", "score_levels", "scores_frame", "ssim",
    "summary_table", "to_y",
]
