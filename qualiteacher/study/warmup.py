"""The shared start of a study: per seed, the pipeline's stages before stage 3, trained once.

Every mode of a seed starts stage 3 from the same warm-up (stage 1 and 2 for IQPIR, and whatever
stages the pipeline runs before stage 3, e.g. the fidelity stage; the supervised warm-up for the
U-Net). The stages run through the pipeline itself (same config, resume and MLflow logging), in a
pipeline folder per seed whose MLflow parent run is the study's warm-up run of that seed.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qualiteacher.data.demo import build_demo
from qualiteacher.iqa.cache import grade_clean_images
from qualiteacher.pipeline.api import ConfigError, PipelineConfig, PipelineState, StagePlan, run_pipeline, student_stages
from qualiteacher.say import say


def warm_stages(cfg: PipelineConfig) -> list[str]:
    """The pipeline's stages before stage 3 for this config's student (``data`` included)."""
    stages = student_stages(cfg.student)
    return stages[: stages.index("stage3")]


def grade_labeled(cfg: PipelineConfig, stage3: StagePlan, table: Path, exclude: tuple[str, ...]) -> Path:
    """Build the demo data when it is missing, then grade the labeled clean images with stage 3's
    ensemble minus ``exclude`` (the stage-1 HQ gate must not see a held-out member) into ``table``
    (once per study: every seed reads it)."""
    root = Path(cfg.data_root)
    if not (cfg.task_data / "labeled").is_dir():
        if not cfg.demo.generate:
            raise ConfigError(f"data_root: no labeled data at {cfg.task_data / 'labeled'} and demo generation is off")
        say(f"[study] building the demo data in {root}")
        build_demo(root, progress=cfg.progress, overwrite=True, **cfg.demo.build_options())
    if cfg.student == "iqpir" and not table.is_file():
        scores = grade_clean_images(cfg.task_data / "labeled" / "gt", cfg.task, stage3.args.model.iqa_preset,
                                    table.parent / "iqa_cache.parquet", exclude=exclude)
        table.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(table, index=False)
    return table


def warm_up(cfg: PipelineConfig, parent_run: Callable[[], str]) -> None:
    """Run, resume or skip the warm-up stages of ``cfg`` (into ``cfg.out``; each stage seeds itself
    from its ``data.seed``, which :func:`~qualiteacher.study.runner.seed_config` sets to the study's seed).

    ``parent_run()`` gives the MLflow run the stages' runs nest under (asked for once per folder).
    """
    state = PipelineState(cfg.out / "state.json")
    if "parent_run_id" not in state.data:
        state.data["parent_run_id"] = parent_run()
        state.save()
    for stage in warm_stages(cfg):
        if PipelineState(cfg.out / "state.json").done(stage):
            continue
        run_pipeline(cfg, only_stage=stage)
