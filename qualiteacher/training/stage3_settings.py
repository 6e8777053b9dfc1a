"""Stage 3's settings as typed groups, built from ``QualiTeacherModule``'s flat arguments.

Users, config files, checkpoints' hyper-parameters, MLflow's parameters, the study's mode
overrides and the registry all name stage-3 settings by flat keys (``w_pref``, ``pref_beta``,
``bank_k`` ...); the module keeps that flat signature for LightningCLI and turns it into a
:class:`Stage3Settings` at once (:data:`FLAT_KEYS` says where each key goes), so the rest of stage 3
reads ``settings.preference.beta``. The groups have no defaults: the module's signature is the one
place that has them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from qualiteacher.losses.consistency import ConsistencySettings
from qualiteacher.losses.preference import PreferenceSettings
from qualiteacher.teacher.views import check_views

Mode = Literal["qualiteacher", "supervised", "mean_teacher"]
MODES: tuple[str, ...] = ("qualiteacher", "supervised", "mean_teacher")


@dataclass(frozen=True)
class StudentSettings:
    kind: Literal["iqpir", "unet"]       # student
    preset: str
    cond_mode: Literal["add", "adaln"]
    init_from: str | None                # the warmed-up student, loaded in setup
    fidelity_w: float
    adain: bool
    prior: str | None                    # fusion_prior: the classical restorer the image fusion reads
    compile: bool                        # compile_student
    strong_aug_p: float                  # probability of the strong photometric view's colour jitter
    strong_aug_target: bool = False      # that colour jitter also on the image's pseudo-label targets


@dataclass(frozen=True)
class GradingSettings:
    """The IQA ensemble's part: grading, levels, reliability masks, reward."""

    preset: str                          # iqa_preset
    task: str | None
    weights_dir: str | None              # iqa_weights_dir
    exclude: tuple[str, ...]             # iqa_exclude: members left out of training altogether
    reward_detach: tuple[str, ...]       # members in the reward's value, not in its gradient
    bf16: bool                           # iqa_bf16
    mask_block: int
    use_mask: bool
    level_rule: Literal["default", "quantile", "relative", "relative_drop"]
    level_pool_size: int


@dataclass(frozen=True)
class TeacherSettings:
    """EMA teacher, its views, multi-augmentation and the pseudo-label bank (METHOD.md §3)."""

    ema_decay: float
    bank_k: int
    bank_dir: str | None
    bank_cache: int
    views: tuple[str, ...]
    n_aug_variants: int
    aug_kinds: tuple[str, ...]
    aug_max_strength: float
    refresh_every: int
    train_on_variants: bool

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        check_views(self.views)


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    cond_lr_mult: float                  # the zero-initialised quality conditioning's rate: cond_lr_mult × lr
    schedule: Literal["constant", "cosine"]  # lr_schedule
    betas: tuple[float, float]
    weight_decay: float

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.schedule!r}")


@dataclass(frozen=True)
class LossWeights:
    """``L_sup + w_pl L_pl + w_pref L_pref + w_crop L_crop + w_aux (backbone losses)`` (+ ``w_sup_top
    L_sup_top``: the paired data again at the top level, off in METHOD.md's recipe)."""

    sup: float
    pl: float
    pref: float
    crop: float
    aux: float
    sup_top: float = 0.0

    def __post_init__(self) -> None:
        if self.sup_top < 0:
            raise ValueError(f"w_sup_top must be >= 0, got {self.sup_top}")


@dataclass(frozen=True)
class Stage3Settings:
    mode: Mode
    seed: int
    condition_on_level: bool             # False: every student call at the top level ("-conditioning")
    student: StudentSettings
    grading: GradingSettings
    teacher: TeacherSettings
    preference: PreferenceSettings
    consistency: ConsistencySettings
    optim: OptimSettings
    weights: LossWeights

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be qualiteacher, supervised or mean_teacher, got {self.mode!r}")

    @property
    def top_level(self) -> int:
        return self.preference.top_level

    def preference_on(self, step: int) -> bool:
        return self.weights.pref > 0 and step >= self.preference.start_step

    def consistency_on(self, step: int) -> bool:
        return self.weights.crop > 0 and step >= self.consistency.start_step

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Stage3Settings:
        """The groups of ``QualiTeacherModule``'s flat arguments (lists become tuples); raises
        ``ValueError`` on a bad value. A baseline mode's groups have what it leaves out switched
        off whatever the flat values say (no multi-augmentation, no preference, no consistency)."""
        unknown = sorted(set(flat) - set(FLAT_KEYS))
        if unknown:
            raise TypeError(f"unknown stage-3 settings: {unknown}")
        parts: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
        for key, value in flat.items():
            group, name = FLAT_KEYS[key]
            parts[group][name] = tuple(value) if isinstance(value, list) else value
        settings = cls(**parts.pop(""), **{g: _GROUPS[g](**values) for g, values in parts.items() if g})
        if settings.mode == "qualiteacher":
            return settings
        return replace(settings, teacher=replace(settings.teacher, n_aug_variants=0),
                       weights=replace(settings.weights, pref=0.0, crop=0.0))

    def to_flat(self) -> dict[str, Any]:
        """The flat arguments these groups were built from (a baseline's switched-off parts as such)."""
        return {key: getattr(getattr(self, group) if group else self, name) for key, (group, name) in FLAT_KEYS.items()}


_GROUPS: dict[str, type] = {
    "": Stage3Settings, "student": StudentSettings, "grading": GradingSettings, "teacher": TeacherSettings,
    "preference": PreferenceSettings, "consistency": ConsistencySettings, "optim": OptimSettings,
    "weights": LossWeights,
}

# every flat constructor argument of QualiTeacherModule (but ``ensemble``): (group, field); "" = the root
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "mode": ("", "mode"), "seed": ("", "seed"), "condition_on_level": ("", "condition_on_level"),
    "student": ("student", "kind"), "preset": ("student", "preset"), "cond_mode": ("student", "cond_mode"),
    "init_from": ("student", "init_from"), "fidelity_w": ("student", "fidelity_w"), "adain": ("student", "adain"),
    "fusion_prior": ("student", "prior"),
    "compile_student": ("student", "compile"), "strong_aug_p": ("student", "strong_aug_p"),
    "strong_aug_target": ("student", "strong_aug_target"),
    "iqa_preset": ("grading", "preset"), "task": ("grading", "task"), "iqa_weights_dir": ("grading", "weights_dir"),
    "iqa_exclude": ("grading", "exclude"), "reward_detach": ("grading", "reward_detach"),
    "iqa_bf16": ("grading", "bf16"), "mask_block": ("grading", "mask_block"), "use_mask": ("grading", "use_mask"),
    "level_rule": ("grading", "level_rule"), "level_pool_size": ("grading", "level_pool_size"),
    "ema_decay": ("teacher", "ema_decay"), "bank_k": ("teacher", "bank_k"), "bank_dir": ("teacher", "bank_dir"),
    "bank_cache": ("teacher", "bank_cache"), "views": ("teacher", "views"),
    "n_aug_variants": ("teacher", "n_aug_variants"), "aug_kinds": ("teacher", "aug_kinds"),
    "aug_max_strength": ("teacher", "aug_max_strength"), "refresh_every": ("teacher", "refresh_every"),
    "train_on_variants": ("teacher", "train_on_variants"),
    "pref_mode": ("preference", "mode"), "pref_beta": ("preference", "beta"), "pref_delta": ("preference", "delta"),
    "pref_lambda": ("preference", "lam"), "pref_lambda2": ("preference", "lam2"),
    "low_levels": ("preference", "low_levels"), "top_level": ("preference", "top_level"),
    "pref_levels_per_step": ("preference", "levels_per_step"), "pref_start_step": ("preference", "start_step"),
    "crop_fraction": ("consistency", "fraction"), "crop_windows": ("consistency", "windows"),
    "crop_start_step": ("consistency", "start_step"),
    "lr": ("optim", "lr"), "cond_lr_mult": ("optim", "cond_lr_mult"), "lr_schedule": ("optim", "schedule"),
    "betas": ("optim", "betas"), "weight_decay": ("optim", "weight_decay"),
    "w_sup": ("weights", "sup"), "w_pl": ("weights", "pl"), "w_pref": ("weights", "pref"),
    "w_crop": ("weights", "crop"), "w_aux": ("weights", "aux"), "w_sup_top": ("weights", "sup_top"),
}
