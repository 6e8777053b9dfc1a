"""The staged recipe of one task: data → stage 1 → stage 2 → fidelity → stage 3 → eval → register.

Every stage runs in its own MLflow child run under one parent run per pipeline. The pipeline's
state (run ids, finished stages) lives in ``OUT/state.json``: a finished stage is skipped on rerun,
an interrupted one resumes from its last checkpoint in the same MLflow run. This module is where
the typed config is taken apart: each stage function gets only the pieces it reads.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qualiteacher import console
from qualiteacher.iqa.presets import MEANINGLESS, random_iqa_enabled
from qualiteacher.pipeline.config import TRAINING_STAGES, ConfigError, PipelineConfig, student_stages
from qualiteacher.pipeline.sections import (
    FINGERPRINT_FILE,
    RunPlan,
    changed_settings,
    check_data_folders,
    plan_run,
    stage_fingerprint,
)
from qualiteacher.pipeline.stages.data import QualityGrading, prepare_data
from qualiteacher.pipeline.stages.evaluate import evaluate_pipeline
from qualiteacher.pipeline.stages.register import register_student
from qualiteacher.pipeline.stages.train import train_stage
from qualiteacher.pipeline.state import FolderLock, PipelineState
from qualiteacher.tracking.runs import PipelineRuns
from qualiteacher.training.distributed import launch_rank


def git_commit() -> str:
    """The code's commit (``unknown`` outside a git checkout), tagged on every run."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def quality_grading(plan: RunPlan) -> QualityGrading | None:
    """The data stage's grading of the labeled clean images: for the IQPIR student's stage-1 HQ
    gate, with stage 3's ensemble; ``None`` for the U-Net (no stage 1)."""
    cfg = plan.cfg
    if cfg.student != "iqpir":
        return None
    stage1, stage3 = plan.stage("stage1").args, plan.stage("stage3").args
    return QualityGrading(table=Path(stage1.data.quality_table or cfg.out / "labeled_quality.csv"),
                          iqa_preset=stage3.model.iqa_preset, weights_dir=stage3.model.iqa_weights_dir,
                          cache=cfg.out / "iqa_cache.parquet")


def run_training_stage(plan: RunPlan, stage: str, runs: PipelineRuns | None, run_id: str | None,
                       restart: bool = False) -> Path:
    """Fit training stage ``stage`` of ``plan``; returns its final checkpoint (see :func:`train_stage`;
    ``restart``: a checkpoint of other settings is set aside and the stage trains from its start)."""
    return train_stage(plan.stage(stage), runs, run_id, checkpoint_every=plan.cfg.checkpoint_every,
                       progress=console.show_progress(plan.cfg.progress), restart=restart)


def run_stage(stage: str, plan: RunPlan, runs: PipelineRuns, rerun: bool = False) -> None:
    """Run one stage of ``plan`` in its MLflow child run (created, or reopened on resume); ``rerun``:
    asked for by --from-stage / --only-stage (changed settings retrain a stage from its start)."""
    cfg = plan.cfg
    run_id = runs.child(stage)
    if random_iqa_enabled():  # stand-in IQA weights: every run of this pipeline says so
        for rid in (runs.parent_id, run_id):
            runs.client.set_tag(rid, "iqa_scores", MEANINGLESS)
    if stage == "data":
        prepare_data(Path(cfg.data_root), cfg.task, cfg.demo, quality_grading(plan), runs, run_id,
                     progress=console.show_progress(cfg.progress))
    elif stage in TRAINING_STAGES:
        run_training_stage(plan, stage, runs, run_id, restart=rerun)
    elif stage == "eval":
        evaluate_pipeline(cfg.task, cfg.eval, plan.stage("stage3"), cfg.task_data / cfg.eval.split,
                          cfg.out / "eval", runs, run_id)
    elif stage == "register":
        register_student(cfg.out / "stage3" / "final.ckpt", cfg.task, runs, run_id)
    runs.finish(run_id)


def _note_changed_settings(plan: RunPlan, stage: str) -> None:
    """One line when a finished training stage was trained with settings other than ``plan``'s."""
    recorded = plan.cfg.out / stage / FINGERPRINT_FILE
    if stage not in TRAINING_STAGES or not recorded.is_file():
        return
    try:
        before = json.loads(recorded.read_text())
    except ValueError:
        return
    now = stage_fingerprint(plan.stage(stage))
    if before.get("digest") != now.digest:
        changes = changed_settings(before.get("settings") or {}, now.settings)
        console.say(f"  {stage}: trained earlier with other settings ({changes}); kept as it is: "
                    f"--from-stage {stage} trains it again with these", "quiet")


def run_worker(plan: RunPlan, stages: list[str], state: PipelineState, poll_s: float = 2.0,
               timeout_s: float = 24 * 3600, rerun: bool = False) -> None:
    """A DDP worker process (``launch_rank() > 0``): train each of ``stages``' training stages
    alongside rank 0, and nothing else. Rank 0 alone builds the data, writes the pipeline state,
    tracks in MLflow, evaluates and registers.

    A worker started by an external launcher (SLURM, torchrun) starts with rank 0: it first waits
    until rank 0 has finished the data stage (``state.json``; the folder must be shared).
    """
    if "data" in stages:
        deadline = time.monotonic() + timeout_s
        while not PipelineState(state.path).done("data"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not finish the data stage within {timeout_s:.0f} s ({state.path})")
            time.sleep(poll_s)
    for stage in stages:
        if stage in TRAINING_STAGES:
            final = run_training_stage(plan, stage, None, None, restart=rerun)
            # not `say`: it speaks for the main process only, and this line is a worker's
            print(f"[rank {launch_rank()}] {stage}: trained alongside rank 0 ({final})", flush=True)


def run_pipeline(cfg: PipelineConfig, from_stage: str | None = None, only_stage: str | None = None) -> dict[str, Any]:
    """Run (or resume) the staged recipe described by a resolved config; returns the state dict.

    The output folder is locked for the run (``OUT/pipeline.lock``): a second pipeline there fails
    at once with :class:`FolderInUse`; DDP workers (rank > 0) share rank 0's lock."""
    if launch_rank() > 0:
        return _run_pipeline(cfg, from_stage, only_stage)
    with FolderLock(cfg.out, " ".join(["qualiteacher", *sys.argv[1:]])) as lock:
        if lock.took_over:
            console.say(f"  [lock] {cfg.out}: the lock of {lock.took_over} was taken over", "quiet")
        return _run_pipeline(cfg, from_stage, only_stage)


def _run_pipeline(cfg: PipelineConfig, from_stage: str | None, only_stage: str | None) -> dict[str, Any]:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    state = PipelineState(out / "state.json")
    stages = student_stages(cfg.student)
    if only_stage:
        stages = [only_stage]
    elif from_stage:
        if from_stage not in stages:
            raise ConfigError(f"--from-stage {from_stage}: the {cfg.student} recipe has no such stage "
                              f"({', '.join(stages)})")
        stages = stages[stages.index(from_stage):]
        for s in stages:  # rerun from here: forget completion, keep run ids
            state.stage(s).pop("done", None)
    plan = plan_run(cfg, stages)  # every section this run reads, parsed and checked once, before anything trains
    if "data" not in stages or not cfg.demo.generate:
        check_data_folders(plan, stages)
    if launch_rank() > 0:  # a DDP worker: it trains alongside rank 0, which alone records and evaluates
        run_worker(plan, [s for s in stages if only_stage or not state.done(s)], state,
                   rerun=bool(from_stage or only_stage))
        return state.data
    plain = cfg.to_dict()
    (out / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    runs = PipelineRuns(plain, state, workdir=Path.cwd(), commit=git_commit())
    try:
        return _run_stages(plan, stages, state, runs, from_stage, only_stage, plain)
    finally:
        runs.close()  # tracking writes the store refused: sent now, or one line saying where they wait


def _run_stages(plan: RunPlan, stages: list[str], state: PipelineState, runs: PipelineRuns,
                from_stage: str | None, only_stage: str | None, plain: dict[str, Any]) -> dict[str, Any]:
    cfg = plan.cfg
    runs.start_parent()
    start = time.perf_counter()
    for stage in stages:
        if state.done(stage) and not only_stage:
            console.stage_skipped(cfg.task, stage)
            _note_changed_settings(plan, stage)
            continue
        console.stage_start(cfg.task, stage, cfg.student)
        try:
            run_stage(stage, plan, runs, rerun=bool(from_stage or only_stage))
        except BaseException as err:
            runs.fail_stage(stage, err)  # the stage's run and the parent: FAILED (KILLED on Ctrl+C)
            raise
        if stage == "data":
            check_data_folders(plan, stages)
        state.stage(stage)["done"] = True
        state.save()
        console.stage_done(cfg.task, stage)
    runs.end_parent()
    console.say(console.final_summary(plain, state.data, runs.uri, time.perf_counter() - start), "quiet")
    return state.data
