"""The training stages (stage 1, stage 2, fidelity, stage 3): one Lightning fit each, resumable,
tracked in the stage's MLflow run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from qualiteacher import console
from qualiteacher.checkpoints import resume_checkpoint, rotating_checkpoint
from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.data.io import get_skip_log
from qualiteacher.pipeline.grids import Stage3Visuals
from qualiteacher.pipeline.sections import StagePlan
from qualiteacher.tracking.mlflow_logger import FlushBeforeCheckpoint, MlflowStepLogger, _flatten
from qualiteacher.tracking.runs import PipelineRuns
from qualiteacher.training.reward_guard import RewardGuard

# Stages whose training step leaves trainable weights out of a backward pass by design, so DDP
# must look for unused parameters: stage 1 trains the generator and the discriminator with
# separate backward passes (manual optimisation), each reaching only its own weights. The other
# stages freeze what they do not train (e.g. the quality conditioning until stage 3).
DDP_FIND_UNUSED_STAGES = frozenset({"stage1"})


def stage_trainer(stage: str, folder: Path, trainer_args: dict[str, Any], runs: PipelineRuns | None,
                  run_id: str | None, checkpoint_every: int, progress: bool,
                  extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    """The stage's Trainer: its config plus our MLflow logger, resumable checkpoints in
    ``folder/checkpoints``, the console's step progress bar and key numbers (qualiteacher/console.py)."""
    callbacks: list[L.Callback] = [
        # last.ckpt every n steps; the one before is kept as prev.ckpt (resume falls back to it)
        rotating_checkpoint(folder / "checkpoints", checkpoint_every),
        FlushBeforeCheckpoint(), *extra_callbacks, console.StageNumbers(stage),
    ]
    if progress:
        callbacks.append(console.StepProgressBar(stage))
    args = {k: v for k, v in trainer_args.items() if k not in ("logger", "callbacks", "default_root_dir",
                                                               "enable_progress_bar", "log_every_n_steps")}
    args = {k: v for k, v in args.items() if v is not None}
    args.setdefault("enable_model_summary", console.verbosity() == "verbose")
    logger = MlflowStepLogger(runs.uri, run_id) if runs is not None else False  # None: a DDP worker
    return L.Trainer(**args, logger=logger, callbacks=callbacks,
                     default_root_dir=str(folder), enable_progress_bar=progress, log_every_n_steps=1)


def train_stage(plan: StagePlan, runs: PipelineRuns | None, run_id: str | None, *, checkpoint_every: int,
                progress: bool) -> Path:
    """Fit one stage (resuming from ``last.ckpt`` when present); returns the final checkpoint.

    Under DDP every rank calls this (``runs=None`` on ranks > 0, see
    :func:`qualiteacher.pipeline.run.run_worker`): all of them fit and save the final checkpoint
    together (its hooks gather from every rank); rank 0 alone writes it and tracks the stage in MLflow.
    """
    model = plan.module(**plan.args.model.as_dict())
    data = RestorationDataModule(**plan.args.data.as_dict())
    extra: list[L.Callback] = []
    if plan.name == "stage3" and runs is not None:
        every = max(1, checkpoint_every)
        extra.append(Stage3Visuals(runs, run_id, every_n_steps=every))
        extra.append(RewardGuard(every_n_steps=every))  # fused vs witnesses on a fixed probe
    trainer_args = plan.args.trainer.as_dict()
    trainer = stage_trainer(plan.name, plan.folder, trainer_args, runs, run_id, checkpoint_every, progress, extra)
    if (plan.name in DDP_FIND_UNUSED_STAGES and trainer.world_size > 1
            and trainer_args.get("strategy") in (None, "auto", "ddp")):
        trainer = stage_trainer(plan.name, plan.folder, {**trainer_args, "strategy": "ddp_find_unused_parameters_true"},
                                runs, run_id, checkpoint_every, progress, extra)
    if runs is None and trainer.world_size == 1:
        return plan.final  # a single-process stage: rank 0 trains it alone
    if runs is not None:
        runs.log_params(run_id, _flatten(plan.section))
        runs.log_dict_artifact(run_id, plan.section, f"{plan.name}_config.yaml")
    last = resume_checkpoint(plan.folder / "checkpoints")  # last.ckpt, or prev.ckpt (warned) if last is cut short
    if last is not None:
        console.say(f"  {plan.name}: resuming from {last}", "quiet")
    with console.fit_warnings(model, data, val_used=plan.name == "stage3"):  # the reward guard probes val pairs
        trainer.fit(model, datamodule=data, ckpt_path=str(last) if last is not None else None)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"{plan.name} interrupted; rerun the same command to resume")
    trainer.save_checkpoint(plan.final, weights_only=False)  # every rank; rank 0 writes (full state)
    if runs is None:
        return plan.final
    runs.client.log_artifact(run_id, str(plan.final), artifact_path="checkpoints")
    skipped = get_skip_log()
    console.say(f"  [data] {skipped.summary()}", "quiet" if len(skipped) else "verbose")
    return plan.final
