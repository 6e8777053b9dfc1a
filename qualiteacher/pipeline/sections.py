"""The training stages' LightningCLI sections: the student applied, parsed and checked.

Each training stage is configured by one section (``model``, ``data``, ``trainer``) that
LightningCLI's parser checks against the typed constructors of the stage's ``LightningModule``,
:class:`RestorationDataModule` and ``lightning.Trainer``; the constructors' defaults are the
section's defaults. Every section of a run is parsed, and every Trainer value checked, before the
first stage trains (:func:`validate`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from qualiteacher.pipeline.config import TRAINING_STAGES, ConfigError, PipelineConfig


def stage_classes(student: str) -> dict[str, type]:
    """The ``LightningModule`` of each training stage for ``student``."""
    # imported here, not at the top: torch and Lightning take seconds to import, and the command
    # line (``--help``, config errors) must not wait for them
    from qualiteacher.training.fidelity import FidelityModule
    from qualiteacher.training.stage1 import Stage1Module
    from qualiteacher.training.stage2 import Stage2Module
    from qualiteacher.training.stage3 import QualiTeacherModule
    from qualiteacher.training.warmup import WarmupModule

    return {"stage1": Stage1Module, "stage2": Stage2Module if student == "iqpir" else WarmupModule,
            "fidelity": FidelityModule, "stage3": QualiTeacherModule}


def stage_section(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The LightningCLI config of ``stage`` with the pipeline's student choice applied."""
    section = cfg.section(stage)
    model = section.setdefault("model", {})
    if cfg.student == "unet":
        if stage == "stage2":  # the U-Net's supervised warm-up takes the stage-2 slot
            for k in ("stage1_checkpoint", "fusion", "w_ce", "w_feature", "w_l1"):
                model.pop(k, None)
            model["student"] = "unet"
        if stage == "stage3":
            model["student"] = "unet"
    if stage == "stage3" and model.get("init_from") is None:
        # the student starts from the last training stage before it
        prev = "stage2" if cfg.student == "unet" else "fidelity"
        model["init_from"] = str(cfg.out / prev / "final.ckpt")
    return section


def stage_parser(cls: type) -> Any:
    """LightningCLI's argument parser for one stage: ``model`` (the stage's module), ``data``
    (:class:`RestorationDataModule`) and ``trainer``, typed from the constructor signatures."""
    # lazy: see stage_classes
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    from qualiteacher.data.datamodule import RestorationDataModule

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(cls, "model")
    parser.add_lightning_class_args(RestorationDataModule, "data")
    parser.add_lightning_class_args(L.Trainer, "trainer")
    return parser


def parse_stage(cfg: PipelineConfig, stage: str) -> tuple[Any, Any]:
    """Validate a stage section; returns ``(parser, parsed namespace)``. A wrong key or value
    raises :class:`ConfigError` naming it."""
    parser = stage_parser(stage_classes(cfg.student)[stage])
    try:
        return parser, parser.parse_object(stage_section(cfg, stage))
    except Exception as err:  # jsonargparse's ArgumentError names the key
        raise ConfigError(f"{stage}: {err}") from err


class StagePlan(NamedTuple):
    """One training stage, resolved: what to build and where it writes."""

    name: str
    module: type             # the stage's LightningModule class
    section: dict[str, Any]  # its LightningCLI section as configured, the student applied
    args: Any                # the section parsed (jsonargparse Namespace: model, data, trainer; defaults filled)
    folder: Path             # OUT/<stage>: checkpoints/, final.ckpt

    @property
    def final(self) -> Path:
        return self.folder / "final.ckpt"


def plan_stage(cfg: PipelineConfig, stage: str) -> StagePlan:
    _, args = parse_stage(cfg, stage)
    return StagePlan(stage, stage_classes(cfg.student)[stage], stage_section(cfg, stage), args, cfg.out / stage)


def validate(cfg: PipelineConfig, stages: list[str]) -> None:
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
    import lightning as L  # lazy: see stage_classes

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


def check_data_folders(cfg: PipelineConfig, stages: list[str]) -> None:
    """Every data folder a training stage reads, and the folder the eval stage measures, must exist
    (ConfigError naming the key otherwise): found before anything trains."""
    split = cfg.task_data / cfg.eval.split
    if "eval" in stages and not split.is_dir():
        raise ConfigError(f"eval.split: folder not found: {split} (demo data built before the "
                          f"'{cfg.eval.split}' split existed? rebuild it with `qualiteacher data demo`)")
    for stage in stages:
        if stage not in TRAINING_STAGES:
            continue
        data = stage_section(cfg, stage).get("data", {})
        for key in ("labeled_root", "unlabeled_root", "val_root"):
            if data.get(key) and not Path(data[key]).is_dir():
                hint = f" (optional: --{stage}.data.val_root=null runs without it)" if key == "val_root" else ""
                raise ConfigError(f"{stage}.data.{key}: folder not found: {data[key]}{hint}")
