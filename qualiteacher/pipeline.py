"""The staged recipe of one task: data → stage 1 → stage 2 → stage 3 → evaluation → registration.

Every stage runs in its own MLflow child run under one parent run per pipeline. The pipeline's
state (run ids, finished stages) lives in ``OUT/state.json``: a finished stage is skipped on rerun,
an interrupted one resumes from its last checkpoint in the same MLflow run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qualiteacher.pipeline_config import (STAGES, TASKS, TRAINING_STAGES, ConfigError, list_config_presets,
                                          resolve_config)
from qualiteacher.training.distributed import launch_rank


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class PipelineState:
    """``state.json``: parent run id, per-stage child run ids and completion, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def done(self, name: str) -> bool:
        return bool(self.data["stages"].get(name, {}).get("done"))


def stage_classes(student: str) -> dict[str, type]:
    from qualiteacher.training.fidelity import FidelityModule
    from qualiteacher.training.stage1 import Stage1Module
    from qualiteacher.training.stage2 import Stage2Module
    from qualiteacher.training.stage3 import QualiTeacherModule
    from qualiteacher.training.warmup import WarmupModule

    return {"stage1": Stage1Module, "stage2": Stage2Module if student == "iqpir" else WarmupModule,
            "fidelity": FidelityModule, "stage3": QualiTeacherModule}


def student_stages(student: str) -> list[str]:
    """The stages a student's recipe runs: the U-Net has no codebook (stage 1) and no fidelity path."""
    skip = {"stage1", "fidelity"} if student == "unet" else set()
    return [s for s in STAGES if s not in skip]


def stage_section(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """The LightningCLI config of ``stage`` with the pipeline's student choice applied."""
    section = json.loads(json.dumps(cfg[stage]))
    model = section.setdefault("model", {})
    if cfg["student"] == "unet":
        if stage == "stage2":  # the U-Net's supervised warm-up takes the stage-2 slot
            for k in ("stage1_checkpoint", "fusion", "w_ce", "w_feature", "w_l1"):
                model.pop(k, None)
            model["student"] = "unet"
        if stage == "stage3":
            model["student"] = "unet"
    if stage == "stage3" and model.get("init_from") is None:
        # the student starts from the last training stage before it
        prev = "stage2" if cfg["student"] == "unet" else "fidelity"
        model["init_from"] = str(Path(cfg["out_dir"]) / prev / "final.ckpt")
    return section


def stage_parser(cls: type) -> Any:
    """LightningCLI's argument parser for one stage: ``model`` (the stage's module), ``data``
    (:class:`RestorationDataModule`) and ``trainer``, typed from the constructor signatures."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    from qualiteacher.data.datamodule import RestorationDataModule

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(cls, "model")
    parser.add_lightning_class_args(RestorationDataModule, "data")
    parser.add_lightning_class_args(L.Trainer, "trainer")
    return parser


def parse_stage(cfg: dict[str, Any], stage: str) -> tuple[Any, Any]:
    """Validate a stage section; returns ``(parser, parsed namespace)``. A wrong key or value
    raises :class:`ConfigError` naming it."""
    parser = stage_parser(stage_classes(cfg["student"])[stage])
    try:
        return parser, parser.parse_object(stage_section(cfg, stage))
    except Exception as err:  # jsonargparse's ArgumentError names the key
        raise ConfigError(f"{stage}: {err}") from err


def validate(cfg: dict[str, Any], stages: list[str]) -> None:
    """Parse every training stage's section before the first one trains (config errors fail fast),
    including every Trainer value (:func:`check_trainer_args`)."""
    for stage in stages:
        if stage in TRAINING_STAGES:
            _, ns = parse_stage(cfg, stage)
            check_trainer_args(stage, ns.trainer.as_dict())


_HARDWARE_KEYS = ("accelerator", "strategy", "devices", "num_nodes", "plugins", "sync_batchnorm")


def check_trainer_args(stage: str, trainer_args: dict[str, Any]) -> None:
    """Build the stage's ``lightning.Trainer`` once, on the CPU, with no logger or checkpoints, so
    Lightning checks every value (``max_steps``, intervals, precision ...) before anything trains;
    the hardware keys are checked when the stage starts (a GPU config validates on a laptop)."""
    import logging

    import lightning as L

    args = {k: v for k, v in trainer_args.items() if v is not None and k not in _HARDWARE_KEYS and k not in
            ("logger", "callbacks", "default_root_dir", "enable_checkpointing", "enable_progress_bar",
             "enable_model_summary", "profiler")}
    if trainer_args.get("accelerator") not in (None, "auto", "cpu"):
        args.pop("precision", None)  # e.g. 16-mixed is a GPU precision
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        L.Trainer(**args, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    except Exception as err:  # noqa: BLE001  Lightning's MisconfigurationException, ValueError, TypeError
        raise ConfigError(f"{stage}.trainer: {err}") from None
    finally:
        quiet.setLevel(level)


def check_data_folders(cfg: dict[str, Any], stages: list[str]) -> None:
    """Every data folder a training stage reads must exist (ConfigError naming the key otherwise)."""
    for stage in stages:
        if stage not in TRAINING_STAGES:
            continue
        data = stage_section(cfg, stage).get("data", {})
        for key in ("labeled_root", "unlabeled_root", "val_root"):
            if data.get(key) and not Path(data[key]).is_dir():
                raise ConfigError(f"{stage}.data.{key}: folder not found: {data[key]}")


def run_pipeline(cfg: dict[str, Any], from_stage: str | None = None, only_stage: str | None = None) -> dict[str, Any]:
    """Run (or resume) the staged recipe described by a resolved config; returns the state dict."""
    from qualiteacher.tracking.runs import PipelineRuns

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    state = PipelineState(out / "state.json")
    stages = student_stages(cfg["student"])
    if only_stage:
        stages = [only_stage]
    elif from_stage:
        if from_stage not in stages:
            raise ConfigError(f"--from-stage {from_stage}: the {cfg['student']} recipe has no such stage "
                              f"({', '.join(stages)})")
        stages = stages[stages.index(from_stage):]
        for s in stages:  # rerun from here: forget completion, keep run ids
            state.stage(s).pop("done", None)
    validate(cfg, stages)
    if "data" not in stages or not cfg.get("demo", {}).get("generate", True):
        check_data_folders(cfg, stages)
    if launch_rank() > 0:  # a DDP worker: it trains alongside rank 0, which alone records and evaluates
        from qualiteacher.pipeline_stages import run_worker

        run_worker(cfg, [s for s in stages if only_stage or not state.done(s)], state)
        return state.data
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    runs = PipelineRuns(cfg, state, workdir=Path.cwd(), commit=_git_commit())
    runs.start_parent()
    from qualiteacher import console
    from qualiteacher.pipeline_stages import run_stage

    start = time.perf_counter()
    for stage in stages:
        if state.done(stage) and not only_stage:
            console.stage_skipped(cfg["task"], stage)
            continue
        console.stage_start(cfg["task"], stage, cfg["student"])
        try:
            run_stage(stage, cfg, state, runs)
        except BaseException as err:
            runs.fail_stage(stage, err)  # the stage's run and the parent: FAILED (KILLED on Ctrl+C)
            raise
        if stage == "data":
            check_data_folders(cfg, stages)
        state.stage(stage)["done"] = True
        state.save()
        console.stage_done(cfg["task"], stage)
    runs.end_parent()
    console.say(console.final_summary(cfg, state.data, runs.uri, time.perf_counter() - start), "quiet")
    return state.data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qualiteacher pipeline TASK",
        description="Run a task's staged recipe. Extra options --SECTION.KEY=VALUE override the "
                    "config, e.g. --stage3.model.w_pref=0.5 --stage3.trainer.max_steps=500.",
    )
    p.add_argument("--preset", default="demo", help="config preset: " + ", ".join(list_config_presets()))
    p.add_argument("--config", action="append", default=[], help="extra YAML file(s), merged in order")
    p.add_argument("--from-stage", choices=STAGES, default=None, help="rerun from this stage on")
    p.add_argument("--only-stage", choices=STAGES, default=None, help="run this stage alone")
    p.add_argument("--print_config", "--print-config", action="store_true",
                   help="print the resolved (and validated) configuration and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_const", const="quiet", dest="verbosity", default="normal",
                      help="one line per finished stage and the final summary")
    talk.add_argument("--verbose", action="store_const", const="verbose", dest="verbosity",
                      help="also Lightning's and MLflow's info messages, model summaries, known harmless warnings")
    return p


def run_pipeline_cli(task: str, argv: list[str]) -> int:
    """Entry point of ``qualiteacher pipeline TASK [options]`` and of ``pipelines/<task>.py``."""
    from qualiteacher import console

    args, rest = _parser().parse_known_args(argv)
    console.setup(args.verbosity)  # known harmless messages: see qualiteacher/console.py
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    bad = [a for a in rest if a not in overrides]
    if bad:
        print(f"error: unrecognised argument(s) {bad}; overrides look like --stage3.model.lr=1e-4",
              file=sys.stderr)
        return 2
    tasks = list(TASKS) if task == "all" else [task]
    from qualiteacher.errors import run_with_contract

    def body() -> int:
        try:
            cfgs = [resolve_config(t, args.preset, args.config, overrides) for t in tasks]
            if args.print_config:
                for cfg in cfgs:
                    validate(cfg, student_stages(cfg["student"]))
                    print(yaml.safe_dump(cfg, sort_keys=False))
                return 0
            for cfg in cfgs:
                run_pipeline(cfg, args.from_stage, args.only_stage)
        except ConfigError as err:
            if args.debug:
                raise
            print(f"configuration error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        return 0

    # other expected errors (a missing weight file or checkpoint, a refused checkpoint, an
    # unreachable tracking server): one line, exit code 2 (see qualiteacher.errors)
    return run_with_contract(body, args.debug)
