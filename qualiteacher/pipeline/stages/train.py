"""The training stages (stage 1, stage 2, fidelity, stage 3): one Lightning fit each, resumable,
tracked in the stage's MLflow run.

Resuming is safe and honest: ``last.ckpt`` is read with ``weights_only=True`` (a crafted file is one
``CheckpointError`` line, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says), and every checkpoint
records the fingerprint of the settings it was trained with (:func:`~qualiteacher.pipeline.sections.stage_fingerprint`).
A checkpoint of other settings is never resumed: a rerun that asks for the stage (``--from-stage``,
``--only-stage``) trains it from its start (the old files move to ``OUT/<stage>/superseded``),
anything else is refused with one line saying how to start fresh.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L

from qualiteacher import console
from qualiteacher.checkpoints import read_checkpoint, resume_checkpoint, rotating_checkpoint
from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.data.io import get_skip_log
from qualiteacher.pipeline.config import ConfigError
from qualiteacher.pipeline.grids import Stage3Visuals
from qualiteacher.pipeline.sections import (
    FINGERPRINT_FILE,
    StageFingerprint,
    StagePlan,
    changed_settings,
    stage_fingerprint,
)
from qualiteacher.tracking.mlflow_logger import FlushBeforeCheckpoint, MlflowStepLogger, _flatten
from qualiteacher.tracking.runs import PipelineRuns
from qualiteacher.training.reward_guard import RewardGuard

# Stages whose training step leaves trainable weights out of a backward pass by design, so DDP
# must look for unused parameters: stage 1 trains the generator and the discriminator with
# separate backward passes (manual optimisation), each reaching only its own weights. The other
# stages freeze what they do not train (e.g. the quality conditioning until stage 3).
DDP_FIND_UNUSED_STAGES = frozenset({"stage1"})
FINGERPRINT_KEY = "qualiteacher_settings"  # in every checkpoint: {"digest", "settings"}


class RecordSettings(L.Callback):
    """Writes the stage's settings fingerprint into every checkpoint it saves."""

    def __init__(self, fingerprint: StageFingerprint) -> None:
        self.fingerprint = fingerprint

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[FINGERPRINT_KEY] = {"digest": self.fingerprint.digest, "settings": self.fingerprint.settings}


def _supersede(plan: StagePlan) -> Path:
    """Move the stage's checkpoints, final checkpoint and (if inside the stage folder) pseudo-label
    bank to ``OUT/<stage>/superseded`` (replacing an older one): the stage starts from nothing."""
    old = plan.folder / "superseded"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir(parents=True)
    bank = getattr(plan.args.model, "bank_dir", None)
    moving = [plan.folder / "checkpoints", plan.final, plan.folder / FINGERPRINT_FILE]
    if bank and Path(bank).resolve().is_relative_to(plan.folder.resolve()):
        moving.append(Path(bank))
    for path in moving:
        if path.exists():
            os.replace(path, old / path.name)
    return old


def resume_point(plan: StagePlan, fingerprint: StageFingerprint, restart: bool, rank_zero: bool) -> Path | None:
    """The checkpoint the stage resumes from, or None to train from its start (see the module doc).

    Raises :class:`CheckpointError` for an unreadable or unsafe ``last.ckpt`` and
    :class:`ConfigError` when it was trained with other settings and ``restart`` is False."""
    last = resume_checkpoint(plan.folder / "checkpoints")  # last.ckpt, or prev.ckpt (warned) if last is cut short
    if last is None:
        return None
    recorded = read_checkpoint(last).get(FINGERPRINT_KEY)  # weights_only=True: nothing in it runs
    if not isinstance(recorded, dict) or "digest" not in recorded:
        console.say(f"  {plan.name}: {last} records no settings fingerprint (an older version wrote it); "
                    f"resumed as it is", "quiet")
        return last
    if recorded["digest"] == fingerprint.digest:
        return last
    changes = changed_settings(recorded.get("settings") or {}, fingerprint.settings)
    if not restart:
        raise ConfigError(f"{plan.name}: {last} was trained with other settings ({changes}); resuming it would "
                          f"label a model with settings it was not trained with. Rerun with --from-stage "
                          f"{plan.name} to train {plan.name} from its start with the new settings, or use the "
                          f"old settings to resume")
    where = _supersede(plan) if rank_zero else plan.folder / "superseded"
    console.say(f"  {plan.name}: settings changed since its checkpoints were written ({changes}): training it "
                f"from its start (the old files are in {where})", "quiet")
    return None


def clamp_batch_sizes(plan: StagePlan, data: RestorationDataModule) -> None:
    """A batch cannot hold more images than its set: a larger ``batch_size`` is lowered to the set's
    size, with one line saying so (the loader would serve the whole set as one batch anyway)."""
    data.setup("fit")
    for part, attr in (("labeled", "batch_size"), ("unlabeled", "unlabeled_batch_size")):
        n = len(data.datasets[part]) if part in data.datasets else 0
        asked = getattr(data, attr)
        if n and asked > n:
            setattr(data, attr, n)
            console.say(f"  {plan.name}: data.{attr}={asked} is larger than the {n} {part} images: batches "
                        f"of {n}", "quiet")


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
    # the pipeline's journaled client: metrics the store refuses wait in OUT/tracking, none lost
    logger = MlflowStepLogger(runs.uri, run_id, client=runs.client) if runs is not None else False  # None: a DDP worker
    return L.Trainer(**args, logger=logger, callbacks=callbacks,
                     default_root_dir=str(folder), enable_progress_bar=progress, log_every_n_steps=1)


def train_stage(plan: StagePlan, runs: PipelineRuns | None, run_id: str | None, *, checkpoint_every: int,
                progress: bool, restart: bool = False) -> Path:
    """Fit one stage (resuming from ``last.ckpt`` when present and trained with the same settings;
    ``restart``: when they differ, train from the start instead of refusing); returns the final checkpoint.

    Under DDP every rank calls this (``runs=None`` on ranks > 0, see
    :func:`qualiteacher.pipeline.run.run_worker`): all of them fit and save the final checkpoint
    together (its hooks gather from every rank); rank 0 alone writes it and tracks the stage in MLflow.
    """
    fingerprint = stage_fingerprint(plan)
    # the stage's seed (``data.seed``) also fixes its initial weights and every draw of the modules:
    # the same config trains the same model (it did not: weights started from the process's RNG)
    L.seed_everything(int(plan.args.data.seed), workers=True, verbose=False)
    model = plan.module(**plan.args.model.as_dict())
    data = RestorationDataModule(**plan.args.data.as_dict())
    extra: list[L.Callback] = [RecordSettings(fingerprint)]
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
    last = resume_point(plan, fingerprint, restart, rank_zero=runs is not None)
    clamp_batch_sizes(plan, data)
    if runs is not None:
        runs.log_params(run_id, _flatten(plan.section))
        runs.log_dict_artifact(run_id, plan.section, f"{plan.name}_config.yaml")
    if last is not None:
        console.say(f"  {plan.name}: resuming from {last}", "quiet")
    with console.fit_warnings(model, data, val_used=plan.name == "stage3"):  # the reward guard probes val pairs
        # weights_only=True: explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off
        trainer.fit(model, datamodule=data, ckpt_path=str(last) if last is not None else None, weights_only=True)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"{plan.name} interrupted; rerun the same command to resume")
    trainer.save_checkpoint(plan.final, weights_only=False)  # every rank; rank 0 writes (full state)
    if runs is None:
        return plan.final
    tmp = plan.folder / (FINGERPRINT_FILE + ".tmp")  # what final.ckpt was trained with, for the stages after it
    tmp.write_text(json.dumps({"digest": fingerprint.digest, "settings": fingerprint.settings}, indent=1))
    os.replace(tmp, plan.folder / FINGERPRINT_FILE)
    runs.client.log_artifact(run_id, str(plan.final), artifact_path="checkpoints")
    skipped = get_skip_log()
    console.say(f"  [data] {skipped.summary()}", "quiet" if len(skipped) else "verbose")
    return plan.final
