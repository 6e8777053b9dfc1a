"""The pipeline's public API: what the layers above it (the study, the scripts in ``pipelines/``)
use. Everything else in ``qualiteacher.pipeline`` is internal and may change without notice;
``tests/test_layers.py`` checks that the study imports from here only.

A caller resolves a config once (:func:`resolve_config`, or :meth:`PipelineConfig.merged` for a
variant of one), plans it once (:func:`plan_run`: every stage section it reads parsed and checked)
and hands the plan to what runs it.
"""
from __future__ import annotations

from qualiteacher.pipeline.config import TRAINING_STAGES, ConfigError, PipelineConfig, student_stages
from qualiteacher.pipeline.resolve import resolve_config
from qualiteacher.pipeline.run import git_commit, run_pipeline, run_training_stage
from qualiteacher.pipeline.sections import RunPlan, StagePlan, plan_run
from qualiteacher.pipeline.stages.evaluate import read_test_set
from qualiteacher.pipeline.state import FolderLock, PipelineState

__all__ = [
    "TRAINING_STAGES", "ConfigError", "FolderLock", "PipelineConfig", "PipelineState", "RunPlan", "StagePlan",
    "git_commit", "plan_run", "read_test_set", "resolve_config", "run_pipeline", "run_training_stage",
    "student_stages",
]
