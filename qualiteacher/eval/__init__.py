"""Evaluation: full-reference metrics, NR-IQA versus level, detection mAP, benchmarks, reports.

Names are loaded on first use (an explicit table, PEP 562), so ``qualiteacher --help`` does not
import torchmetrics or pyiqa. `figures` (matplotlib): ``from qualiteacher.eval.figures import image_grid``.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> module of qualiteacher.eval that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("MapResult", "detection_map"), "coco_map"),
    **dict.fromkeys(("DetectionResult", "Detections", "GroundTruth", "GroundTruthSet", "average_precision",
                     "collect_ground_truths", "detections_from_csv", "evaluate_detections",
                     "ground_truths_from_records"), "detection"),
    **dict.fromkeys(("DEFAULT_CLASS_MAPS", "Detector", "MissingDetectorWeightsError", "build_detector",
                     "coco_category_names", "list_detectors", "load_class_map", "run_detector"), "detector"),
    **dict.fromkeys(("psnr", "ssim", "to_y"), "fullref"),
    **dict.fromkeys(("delta_e", "opponent_channels", "opponent_correlation"), "colour"),
    **dict.fromkeys(("DEFAULT_METRICS", "EVAL_METRICS", "OFFLINE_METRICS", "EvalMetric", "MetricSet",
                     "list_eval_metrics", "metric_label", "resolve_metrics", "score_images"), "metrics"),
    **dict.fromkeys(("level_spearman", "score_levels", "scores_frame"), "nriqa"),
    **dict.fromkeys(("build_restorers", "comparison_table", "evaluate_restorers", "format_table",
                     "markdown_table", "summary_table"), "report"),
    **dict.fromkeys(("BENCHMARKS", "Benchmark", "list_benchmarks", "read_benchmark", "resolve_benchmark"),
                    "benchmarks"),
    **dict.fromkeys(("EvalResult", "baseline_restorer", "checkpoint_restorers", "evaluate", "folder_restorer",
                     "log_to_mlflow", "write_results"), "harness"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qualiteacher.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qualiteacher.eval.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
