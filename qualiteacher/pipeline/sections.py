"""The training stages' LightningCLI sections: the student applied, parsed and checked.

Each training stage is configured by one section (``model``, ``data``, ``trainer``) that
LightningCLI's parser checks against the typed constructors of the stage's ``LightningModule``,
:class:`RestorationDataModule` and ``lightning.Trainer``; the constructors' defaults are the
section's defaults. Every section of a run is parsed, and every Trainer value checked, before the
first stage trains (:func:`plan_run`), once per run.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from qualiteacher.pipeline.config import TRAINING_STAGES, ConfigError, PipelineConfig, student_stages


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


# ------------------------------------------------------------------------------ fingerprints
# Trainer keys that change what a training step computes; the others say where it runs, when it
# stops (raising max_steps continues a stage) or what it shows, and leave the fingerprint alone.
TRAINER_COMPUTE_KEYS = ("precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                        "deterministic")
_NOT_COMPUTE = {"data": ("num_workers",), "model": ("bank_cache",)}
FINGERPRINT_FILE = "final.fingerprint.json"  # beside OUT/<stage>/final.ckpt


class StageFingerprint(NamedTuple):
    """What a stage computes: its parsed section (defaults filled; ``model.*``, ``data.*`` and the
    trainer's :data:`TRAINER_COMPUTE_KEYS`) and the identity of every file it reads (``input.*``:
    an upstream stage's fingerprint, or the file's SHA-256), flat, and their digest."""

    digest: str
    settings: dict[str, Any]


def _plain_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def file_identity(path: Path) -> str:
    """``stage:<digest>`` for a stage's ``final.ckpt`` (its recorded fingerprint), else the file's SHA-256."""
    sidecar = path.with_name(FINGERPRINT_FILE)
    if path.name == "final.ckpt" and sidecar.is_file():
        try:
            return "stage:" + json.loads(sidecar.read_text())["digest"]
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: fall back to the content
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


# settings added after checkpoints had been written, with the value that computes what the older code
# computed: left out of the fingerprint at that value, so upgrading retrains nothing
ADDED_NEUTRAL: dict[str, Any] = {"model.strong_aug_target": False}


def stage_fingerprint(plan: StagePlan) -> StageFingerprint:
    """The fingerprint of ``plan`` (see :class:`StageFingerprint`); a setting of ``ADDED_NEUTRAL``
    at its neutral value is left out."""
    parsed = plan.args.as_dict()
    settings: dict[str, Any] = {}
    for part in ("model", "data", "trainer"):
        for key, value in (parsed.get(part) or {}).items():
            if part == "trainer" and key not in TRAINER_COMPUTE_KEYS or key in _NOT_COMPUTE.get(part, ()):
                continue
            if ADDED_NEUTRAL.get(f"{part}.{key}", ...) == value:
                continue
            settings[f"{part}.{key}"] = _plain_value(value)
            if part != "trainer" and isinstance(value, str) and value and Path(value).is_file():
                settings[f"input.{part}.{key}"] = file_identity(Path(value))
    text = json.dumps(settings, sort_keys=True, default=str)
    return StageFingerprint(hashlib.sha256(text.encode()).hexdigest()[:16], settings)


def changed_settings(before: dict[str, Any], now: dict[str, Any], limit: int = 4) -> str:
    """``model.lr 0.0002 → 0.001; ...`` for the keys whose values differ (at most ``limit`` shown)."""
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    shown = [f"{k} {before.get(k, '(unset)')!s:.40} → {now.get(k, '(unset)')!s:.40}" for k in keys[:limit]]
    more = f"; … (+{len(keys) - limit})" if len(keys) > limit else ""
    return "; ".join(shown) + more if keys else "no setting differs"


def plan_stage(cfg: PipelineConfig, stage: str) -> StagePlan:
    """``stage`` of ``cfg`` parsed (:func:`parse_stage`) into what a run builds."""
    _, args = parse_stage(cfg, stage)
    return StagePlan(stage, stage_classes(cfg.student)[stage], stage_section(cfg, stage), args, cfg.out / stage)


# the training stages other stages read: the data stage grades the labeled images for stage 1's
# HQ gate with stage 3's ensemble; the eval stage measures stage 3's student
READS: dict[str, tuple[str, ...]] = {"data": ("stage1", "stage3"), "eval": ("stage3",)}


@dataclass(frozen=True)
class RunPlan:
    """A resolved config ready to run: the training stages a run trains or reads, each parsed once."""

    cfg: PipelineConfig
    stages: dict[str, StagePlan]

    def stage(self, stage: str) -> StagePlan:
        if stage not in self.stages:
            raise KeyError(f"stage {stage!r} is not part of this run's plan ({', '.join(self.stages) or 'none'})")
        return self.stages[stage]


def plan_run(cfg: PipelineConfig, stages: list[str], hardware: bool = True) -> RunPlan:
    """Parse, once, every training stage of ``stages`` and those they read (:data:`READS`), before
    the first stage trains (config errors fail fast), and check every Trainer value of the stages
    that train (:func:`check_trainer_args`) and, with ``hardware``, whether the accelerator each asks
    for is there (:func:`check_hardware`; ``--print_config`` leaves it out, so a GPU config can be
    inspected on a laptop)."""
    recipe = student_stages(cfg.student)
    wanted = [s for s in stages if s in TRAINING_STAGES]
    wanted += [r for s in stages for r in READS.get(s, ()) if r in recipe and r not in wanted]
    plans = {stage: plan_stage(cfg, stage) for stage in TRAINING_STAGES if stage in wanted}
    for stage in stages:
        if stage in TRAINING_STAGES:
            trainer = plans[stage].args.trainer.as_dict()
            check_trainer_args(stage, trainer)
            if hardware:
                check_hardware(stage, trainer)
    return RunPlan(cfg, plans)


def check_hardware(stage: str, trainer_args: dict[str, Any]) -> None:
    """:class:`ConfigError` when ``trainer.accelerator`` names a device this process cannot see
    (``gpu`` / ``cuda`` without CUDA, ``mps`` without Apple's GPU, a TPU ...) or ``trainer.devices``
    asks for more CUDA devices than there are: found before the first stage trains."""
    import torch  # lazy: see stage_classes
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from qualiteacher.devices import gpu_type

    accelerator = str(trainer_args.get("accelerator") or "auto").lower()
    if accelerator in ("auto", "cpu") or not isinstance(trainer_args.get("accelerator", "auto"), str):
        return
    fix = "drop the option (auto: whatever is there) or set accelerator=cpu"
    if accelerator == "gpu":
        if gpu_type() is not None:
            accelerator = gpu_type()
        else:
            raise ConfigError(f"{stage}.trainer.accelerator=gpu: no GPU is visible to this process "
                              f"(torch.cuda.is_available() is False): {fix}")
    if accelerator not in AcceleratorRegistry.available_accelerators():
        known = ", ".join(sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()}))
        raise ConfigError(f"{stage}.trainer.accelerator={accelerator!r} is not an accelerator (known: {known})")
    if not AcceleratorRegistry[accelerator]["accelerator"].is_available():
        raise ConfigError(f"{stage}.trainer.accelerator={accelerator}: no such device is visible to this process: {fix}")
    devices = trainer_args.get("devices")
    if accelerator == "cuda" and devices not in (None, "auto", -1, "-1"):
        have = torch.cuda.device_count()
        ids = devices if isinstance(devices, (list, tuple)) else (
            [d for d in str(devices).split(",") if d.strip()] if "," in str(devices) else None)
        wanted = max(int(i) for i in ids) + 1 if ids else int(devices)
        if wanted > have:
            raise ConfigError(f"{stage}.trainer.devices={devices}: this process sees {have} CUDA device(s)")


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


def check_data_folders(plan: RunPlan, stages: list[str]) -> None:
    """Every data folder a training stage of ``stages`` reads, and the folder the eval stage
    measures, must exist (ConfigError naming the key otherwise): found before anything trains."""
    cfg = plan.cfg
    split = cfg.task_data / cfg.eval.split
    if "eval" in stages and not split.is_dir():
        raise ConfigError(f"eval.split: folder not found: {split} (demo data built before the "
                          f"'{cfg.eval.split}' split existed? rebuild it with `qualiteacher data demo`)")
    for stage in stages:
        if stage not in TRAINING_STAGES:
            continue
        data = plan.stage(stage).section.get("data", {})
        for key in ("labeled_root", "unlabeled_root", "val_root"):
            if data.get(key) and not Path(data[key]).is_dir():
                hint = f" (optional: --{stage}.data.val_root=null runs without it)" if key == "val_root" else ""
                raise ConfigError(f"{stage}.data.{key}: folder not found: {data[key]}{hint}")
