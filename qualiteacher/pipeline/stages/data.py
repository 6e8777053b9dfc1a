"""The data stage: build the demo data if it is missing, then grade the labeled clean images
(the stage-1 high-quality gate of the IQPIR student)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from qualiteacher import console
from qualiteacher.data.demo import build_demo, summarize_manifest
from qualiteacher.iqa.cache import grade_clean_images
from qualiteacher.pipeline.config import ConfigError, DemoSettings
from qualiteacher.tracking.runs import PipelineRuns


class QualityGrading(NamedTuple):
    """Where and with which ensemble the labeled clean images are graded."""

    table: Path              # CSV of scores (stage1.data.quality_table; OUT/labeled_quality.csv by default)
    iqa_preset: str          # stage 3's ensemble (stage3.model.iqa_preset)
    weights_dir: str | None  # its local weight files (stage3.model.iqa_weights_dir)
    cache: Path              # parquet score cache (OUT/iqa_cache.parquet)


def prepare_data(root: Path, task: str, demo: DemoSettings, grading: QualityGrading | None, runs: PipelineRuns,
                 run_id: str, progress: bool = False) -> None:
    """Build the demo data under ``root`` if ``root/TASK/labeled`` is missing (and ``demo.generate``),
    then grade ``root/TASK/labeled/gt`` into ``grading.table`` unless it exists (``grading=None``: a
    student without the HQ gate)."""
    task_data = root / task
    if not (task_data / "labeled").is_dir():
        if not demo.generate:
            raise ConfigError(f"data_root: no labeled data at {task_data / 'labeled'} and demo generation is off")
        console.say(f"  [data] building the demo data in {root}")
        df = build_demo(root, progress=progress, overwrite=True, **demo.build_options())
        console.say(summarize_manifest(df), "verbose")
        console.stage_numbers("data", f"demo data: {len(df)} images in {root}")
    if (root / "manifest.csv").is_file():
        runs.client.log_artifact(run_id, str(root / "manifest.csv"))
    if grading is None or grading.table.is_file():
        return
    scores = grade_clean_images(task_data / "labeled" / "gt", task, grading.iqa_preset, grading.cache,
                                weights_dir=grading.weights_dir)
    grading.table.parent.mkdir(parents=True, exist_ok=True)
    scores.to_csv(grading.table, index=False)
    runs.client.log_artifact(run_id, str(grading.table))
    runs.client.log_metric(run_id, "data/labeled_hq_fraction", float((scores["fused"] >= 0.7).mean()))
    runs.client.log_metric(run_id, "data/labeled_mean_quality", float(scores["fused"].mean()))
