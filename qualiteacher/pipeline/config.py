"""The pipeline's configuration as typed, frozen data, and the stage catalogue.

A pipeline config holds pipeline-level keys (task, folders, student kind, demo data, evaluation)
and one LightningCLI section per training stage (``stage1``, ``stage2``, ``fidelity``, ``stage3``,
each with ``model``, ``data``, ``trainer``). Every pipeline-level key is a typed field below, with
its default defined here once; stage sections stay mappings that LightningCLI validates against the
typed constructor signatures (:mod:`qualiteacher.pipeline.sections`). :meth:`PipelineConfig.from_dict`
is the one way in from YAML or a caller's dict: an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the key, raised before anything runs.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qualiteacher.tasks import TASKS

TRAINING_STAGES = ("stage1", "stage2", "fidelity", "stage3")
STAGES = ("data", "stage1", "stage2", "fidelity", "stage3", "eval", "register")
SECTION_KEYS = ("model", "data", "trainer")
Student = Literal["iqpir", "unet"]


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def student_stages(student: str) -> list[str]:
    """The stages a student's recipe runs: the U-Net has no codebook (stage 1) and no fidelity path."""
    skip = {"stage1", "fidelity"} if student == "unet" else set()
    return [s for s in STAGES if s not in skip]


@dataclass(frozen=True)
class DemoSettings:
    """``demo``: the embedded demo data built under ``data_root`` when the task's folder is missing."""

    generate: bool = True
    seed: int = 0
    size: int = 96
    tasks: tuple[str, ...] = TASKS
    n_labeled: int = 24
    n_unlabeled: int = 24
    n_test: int = 8
    n_clean: int = 48
    n_val: int = 8
    n_unseen: int = 48

    def build_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`qualiteacher.data.demo.build_demo`."""
        return {k: v for k, v in _plain(self).items() if k != "generate"}


@dataclass(frozen=True)
class EvalSettings:
    """``eval``: the evaluation stage, on the held-out test split (``split``: another folder, e.g. val)."""

    levels: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)  # the score-versus-level study
    grid_levels: tuple[int, ...] = (0, 3, 5, 7)         # columns of the image grids
    w: float | None = None                               # fidelity weight of every model (None: the student's own)
    grid_w: tuple[float, ...] = (0.0, 0.5, 1.0)         # rows of eval/level_w_grid.png
    max_images: int | None = None                        # None: every test image
    tile: int | None = None                              # None: the stage-3 training crop
    layout: str = "paired"                               # reader of DATA_ROOT/TASK/<split>
    split: str = "test"                                  # the folder measured: test (held-out photos) or
                                                         # val (training photos: choose settings there)
    unseen: str | None = "unseen"                        # a second real-domain folder measured beside it
                                                         # (rows unseen:NAME, and unseen-clean:NAME given its
                                                         # ground truth), photos no split is cut from; skipped
                                                         # when DATA_ROOT/TASK/<unseen> is missing; None: never


@dataclass(frozen=True)
class PipelineConfig:
    """One task's resolved pipeline configuration (see the module docstring)."""

    task: str
    preset: str
    student: Student = "iqpir"          # iqpir (codebook student) | unet (plug-in conditioned U-Net)
    data_root: str = "demo_data"        # where the task folders live
    out_dir: str = "outputs/{task}"     # stage folders, checkpoints and the pipeline state
    experiment: str = "qualiteacher"    # MLflow experiment
    checkpoint_every: int = 50          # optimizer steps between resumable checkpoints (and stage-3 grids)
    progress: bool = True               # progress bars
    demo: DemoSettings = field(default_factory=DemoSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    stage1: Mapping[str, Any] = field(default_factory=lambda: _freeze({}))
    stage2: Mapping[str, Any] = field(default_factory=lambda: _freeze({}))
    fidelity: Mapping[str, Any] = field(default_factory=lambda: _freeze({}))
    stage3: Mapping[str, Any] = field(default_factory=lambda: _freeze({}))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PipelineConfig:
        """Check and convert a config mapping (YAML values: lists, ints for floats ...)."""
        return _convert(cls, raw, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values (``config.yaml``, ``--print_config``, MLflow parameters)."""
        return _plain(self)

    def merged(self, changes: Mapping[str, Any]) -> PipelineConfig:
        """A new config with ``changes`` merged in (:func:`deep_merge`: nested keys, e.g.
        ``{"stage3": {"model": {"lr": 1e-4}}}``), checked again as :meth:`from_dict` checks."""
        return PipelineConfig.from_dict(deep_merge(self.to_dict(), changes))

    def section(self, stage: str) -> dict[str, Any]:
        """A mutable copy of a training stage's LightningCLI section as written in the config."""
        if stage not in TRAINING_STAGES:
            raise KeyError(f"unknown training stage {stage!r}; known: {', '.join(TRAINING_STAGES)}")
        return _thaw(getattr(self, stage))

    @property
    def out(self) -> Path:
        return Path(self.out_dir)

    @property
    def task_data(self) -> Path:
        """``DATA_ROOT/TASK``: its ``labeled``, ``unlabeled`` and ``test`` folders."""
        return Path(self.data_root) / self.task


# ------------------------------------------------------------------------------ conversion
def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win; lists are replaced, not merged."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _freeze(value: Any) -> Any:
    # read-only views all the way down, so a frozen config cannot change through a section
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _plain(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = _plain(value) if dataclasses.is_dataclass(value) else _thaw(value)
    return out


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if origin is Mapping or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _value(hint: Any, value: Any, key: str) -> Any:
    """``value`` as type ``hint`` (the few kinds a pipeline key has), or ConfigError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok = True
    if dataclasses.is_dataclass(hint):
        ok = isinstance(value, Mapping)
        if ok:
            return _convert(hint, value, f"{key}.")
    elif origin is Mapping:
        ok = isinstance(value, Mapping)
        if ok:
            extra = sorted(set(value) - set(SECTION_KEYS))
            if extra:
                raise ConfigError(f"unknown key(s) {[f'{key}.{k}' for k in extra]}: a stage section "
                                  f"holds only {', '.join(SECTION_KEYS)}")
            bad = [k for k, v in value.items() if v is not None and not isinstance(v, Mapping)]
            if bad:
                raise ConfigError(f"{key}.{bad[0]} must be a mapping, got {value[bad[0]]!r}")
            return _freeze({k: v or {} for k, v in value.items()})
    elif origin is Literal:
        ok = value in args
    elif origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _value(arg, value, key)
            except ConfigError:
                pass
        ok = False
    elif origin is tuple:
        ok = isinstance(value, (list, tuple))
        if ok:
            try:
                return tuple(_value(args[0], v, key) for v in value)
            except ConfigError:
                ok = False
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            return float(value)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"pipeline key {key!r} must be {_describe(hint)}, got {value!r}")
    return value


def _convert(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown pipeline key(s) {[prefix + k for k in unknown]}; "
                          f"known: {sorted(prefix + k for k in hints)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"pipeline key(s) {[prefix + k for k in missing]} missing")
    return cls(**{k: _value(hints[k], v, prefix + k) for k, v in raw.items()})
