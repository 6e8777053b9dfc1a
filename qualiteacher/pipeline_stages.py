"""What each pipeline stage does: data, the three training stages, evaluation, registration."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from qualiteacher.pipeline import PipelineState, parse_stage, stage_classes, stage_section
from qualiteacher.pipeline_config import TRAINING_STAGES
from qualiteacher.tracking.mlflow_logger import FlushBeforeCheckpoint, MlflowStepLogger, _flatten
from qualiteacher.tracking.runs import PipelineRuns


def run_stage(stage: str, cfg: dict[str, Any], state: PipelineState, runs: PipelineRuns) -> None:
    run_id = runs.child(stage)
    from qualiteacher.iqa.presets import MEANINGLESS, random_iqa_enabled

    if random_iqa_enabled():  # stand-in IQA weights: every run of this pipeline says so
        for rid in (runs.parent_id, run_id):
            runs.client.set_tag(rid, "iqa_scores", MEANINGLESS)
    if stage == "data":
        prepare_data(cfg, runs, run_id)
    elif stage in TRAINING_STAGES:
        train_stage(stage, cfg, runs, run_id)
    elif stage == "eval":
        from qualiteacher.pipeline_eval import evaluate_pipeline

        evaluate_pipeline(cfg, runs, run_id)
    elif stage == "register":
        register_student(cfg, runs, run_id)
    runs.finish(run_id)


# ---------------------------------------------------------------------------- data
def prepare_data(cfg: dict[str, Any], runs: PipelineRuns, run_id: str) -> None:
    """Build the demo data if it is missing, then grade the labeled clean images (stage-1 HQ gate)."""
    root, task = Path(cfg["data_root"]), cfg["task"]
    demo = cfg.get("demo", {})
    if not (root / task / "labeled").is_dir():
        if not demo.get("generate", True):
            from qualiteacher.pipeline_config import ConfigError

            raise ConfigError(f"data_root: no labeled data at {root / task / 'labeled'} and demo generation is off")
        from qualiteacher import console
        from qualiteacher.data.demo import build_demo, summarize_manifest

        console.say(f"  [data] building the demo data in {root}")
        options = {k: v for k, v in demo.items() if k != "generate"}
        df = build_demo(root, progress=console.show_progress(cfg), overwrite=True, **options)
        console.say(summarize_manifest(df), "verbose")
        console.stage_numbers("data", f"demo data: {len(df)} images in {root}")
    if (root / "manifest.csv").is_file():
        runs.client.log_artifact(run_id, str(root / "manifest.csv"))
    table = Path(cfg["stage1"].get("data", {}).get("quality_table") or Path(cfg["out_dir"]) / "labeled_quality.csv")
    if cfg["student"] == "iqpir" and not table.is_file():
        from qualiteacher.iqa.cache import grade_clean_images

        scores = grade_clean_images(root / task / "labeled" / "gt", task,
                                    cfg["stage3"]["model"].get("iqa_preset", "offline"),
                                    Path(cfg["out_dir"]) / "iqa_cache.parquet",
                                    weights_dir=cfg["stage3"]["model"].get("iqa_weights_dir"))
        table.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(table, index=False)
        runs.client.log_artifact(run_id, str(table))
        runs.client.log_metric(run_id, "data/labeled_hq_fraction", float((scores["fused"] >= 0.7).mean()))
        runs.client.log_metric(run_id, "data/labeled_mean_quality", float(scores["fused"].mean()))


# ---------------------------------------------------------------------------- training
def stage_trainer(cfg: dict[str, Any], stage: str, trainer_args: dict[str, Any], runs: PipelineRuns | None,
                  run_id: str | None, extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    """The stage's Trainer: its config plus our MLflow logger, resumable checkpoints, the console's
    step progress bar and key numbers (qualiteacher/console.py)."""
    from qualiteacher import console
    from qualiteacher.checkpoints import rotating_checkpoint

    out = Path(cfg["out_dir"]) / stage
    progress = console.show_progress(cfg)
    callbacks: list[L.Callback] = [
        # last.ckpt every n steps; the one before is kept as prev.ckpt (resume falls back to it)
        rotating_checkpoint(out / "checkpoints", int(cfg.get("checkpoint_every", 50))),
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
                     default_root_dir=str(out), enable_progress_bar=progress, log_every_n_steps=1)


# Stages whose training step leaves trainable weights out of a backward pass by design, so DDP
# must look for unused parameters: stage 1 trains the generator and the discriminator with
# separate backward passes (manual optimisation), each reaching only its own weights. The other
# stages freeze what they do not train (e.g. the quality conditioning until stage 3).
DDP_FIND_UNUSED_STAGES = frozenset({"stage1"})


def train_stage(stage: str, cfg: dict[str, Any], runs: PipelineRuns | None, run_id: str | None) -> Path:
    """Fit one stage (resuming from ``last.ckpt`` when present); returns the final checkpoint.

    Under DDP every rank calls this (``runs=None`` on ranks > 0, see :func:`run_worker`): all of
    them fit and save the final checkpoint together (its hooks gather from every rank); rank 0
    alone writes it and tracks the stage in MLflow.
    """
    parser, ns = parse_stage(cfg, stage)
    cls = stage_classes(cfg["student"])[stage]
    from qualiteacher.data.datamodule import RestorationDataModule

    model = cls(**ns.model.as_dict())
    data = RestorationDataModule(**ns.data.as_dict())
    extra: list[L.Callback] = []
    if stage == "stage3" and runs is not None:
        from qualiteacher.pipeline_eval import Stage3Visuals

        extra.append(Stage3Visuals(runs, run_id, every_n_steps=max(1, int(cfg.get("checkpoint_every", 50)))))
        from qualiteacher.training.reward_guard import RewardGuard  # fused vs witnesses on a fixed probe

        extra.append(RewardGuard(every_n_steps=max(1, int(cfg.get("checkpoint_every", 50)))))
    trainer_args = ns.trainer.as_dict()
    trainer = stage_trainer(cfg, stage, trainer_args, runs, run_id, extra)
    if stage in DDP_FIND_UNUSED_STAGES and trainer.world_size > 1 and trainer_args.get("strategy") in (None, "auto", "ddp"):
        trainer = stage_trainer(cfg, stage, {**trainer_args, "strategy": "ddp_find_unused_parameters_true"},
                                runs, run_id, extra)
    out = Path(cfg["out_dir"]) / stage
    final = out / "final.ckpt"
    if runs is None and trainer.world_size == 1:
        return final  # a single-process stage: rank 0 trains it alone
    if runs is not None:
        section = stage_section(cfg, stage)
        runs.log_params(run_id, _flatten(section))
        runs.log_dict_artifact(run_id, section, f"{stage}_config.yaml")
    from qualiteacher import console
    from qualiteacher.checkpoints import resume_checkpoint

    last = resume_checkpoint(out / "checkpoints")  # last.ckpt, or prev.ckpt (warned) if last is cut short
    if last is not None:
        console.say(f"  {stage}: resuming from {last}", "quiet")
    with console.fit_warnings(model, data):
        trainer.fit(model, datamodule=data, ckpt_path=str(last) if last is not None else None)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"{stage} interrupted; rerun the same command to resume")
    trainer.save_checkpoint(final, weights_only=False)  # every rank; rank 0 writes (full state)
    if runs is None:
        return final
    runs.client.log_artifact(run_id, str(final), artifact_path="checkpoints")
    from qualiteacher.data.io import get_skip_log

    skipped = get_skip_log()
    console.say(f"  [data] {skipped.summary()}", "quiet" if len(skipped) else "verbose")
    return final


def run_worker(cfg: dict[str, Any], stages: list[str], state: PipelineState, poll_s: float = 2.0,
               timeout_s: float = 24 * 3600) -> None:
    """A DDP worker process (``launch_rank() > 0``): train each of ``stages``' training stages
    alongside rank 0, and nothing else. Rank 0 alone builds the data, writes the pipeline state,
    tracks in MLflow, evaluates and registers.

    A worker started by an external launcher (SLURM, torchrun) starts with rank 0: it first waits
    until rank 0 has finished the data stage (``state.json``; the folder must be shared).
    """
    import time

    if "data" in stages:
        deadline = time.monotonic() + timeout_s
        while not PipelineState(state.path).done("data"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not finish the data stage within {timeout_s:.0f} s ({state.path})")
            time.sleep(poll_s)
    from qualiteacher.training.distributed import launch_rank

    for stage in stages:
        if stage in TRAINING_STAGES:
            final = train_stage(stage, cfg, None, None)
            print(f"[rank {launch_rank()}] {stage}: trained alongside rank 0 ({final})", flush=True)


# ---------------------------------------------------------------------------- registration
def load_stage3(cfg: dict[str, Any]) -> Any:
    """The trained QualiTeacher module of ``OUT/stage3/final.ckpt`` (student and teacher) on the CPU."""
    from qualiteacher.training.stage3 import load_trained

    return load_trained(Path(cfg["out_dir"]) / "stage3" / "final.ckpt")


def register_student(cfg: dict[str, Any], runs: PipelineRuns, run_id: str) -> None:
    """Log the final student as an MLflow model and register a version named after the task."""
    import mlflow

    module = load_stage3(cfg)
    name = f"qualiteacher-{cfg['task']}"
    mlflow.set_tracking_uri(runs.uri)
    from qualiteacher.registry import log_student

    with mlflow.start_run(run_id=run_id):
        # weights as tensors + the pinned installed code, no pickle (qualiteacher.registry)
        info = log_student(module.student, dict(module.hparams), name="student", registered_model_name=name)
    from qualiteacher import console

    console.stage_numbers("register", f"model {name} from {info.model_uri}")
