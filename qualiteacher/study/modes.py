"""The training modes a study compares: an explicit catalogue of stage-3 constructor overrides.

Each entry is applied on top of the preset's ``stage3.model`` section. ``supervised`` and
``mean_teacher`` are the baselines (``QualiTeacherModule(mode=...)`` enforces what they leave out;
the weights are zeroed here too so the logged parameters say so); ``qualiteacher-X`` is the full
method without part X.
"""
from __future__ import annotations

import copy
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

MODES: dict[str, dict[str, Any]] = {
    # L_sup alone on the paired data, same steps (no unlabeled data, teacher, bank or ensemble)
    "supervised": {"mode": "supervised", "w_pl": 0.0, "w_pref": 0.0, "w_crop": 0.0, "n_aug_variants": 0},
    # plain Mean Teacher: EMA teacher, views, best-k bank, masked L1 to its pseudo-labels, unconditioned
    "mean_teacher": {"mode": "mean_teacher", "w_pref": 0.0, "w_crop": 0.0, "n_aug_variants": 0},
    "qualiteacher": {"mode": "qualiteacher"},
    # the target-domain upper bound: L_sup on the unlabeled photos' own ground truth (DATA/oracle/TASK,
    # which no other mode reads; see MODE_DATA), same steps
    "oracle": {"mode": "supervised", "w_pl": 0.0, "w_pref": 0.0, "w_crop": 0.0, "n_aug_variants": 0},
    "qualiteacher-preference": {"mode": "qualiteacher", "w_pref": 0.0},
    "qualiteacher-consistency": {"mode": "qualiteacher", "w_crop": 0.0},
    "qualiteacher-multiaug": {"mode": "qualiteacher", "n_aug_variants": 0},
    "qualiteacher-mask": {"mode": "qualiteacher", "use_mask": False},
    "qualiteacher-conditioning": {"mode": "qualiteacher", "condition_on_level": False},
}

# stage-3 data overrides of a mode ({data_root}, {task} filled in by `mode_data_overrides`)
MODE_DATA: dict[str, dict[str, Any]] = {
    "oracle": {"labeled_root": "{data_root}/oracle/{task}", "unlabeled_root": None},
}

# named groups accepted wherever a list of modes is
GROUPS: dict[str, tuple[str, ...]] = {
    "headline": ("supervised", "mean_teacher", "qualiteacher"),
    "ablations": tuple(m for m in MODES if m.startswith("qualiteacher-")),
    "all": tuple(MODES),
}


def list_modes() -> list[str]:
    return list(MODES)


def mode_overrides(name: str, variants: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The stage-3 model overrides of mode ``name`` (a copy). ``variants`` adds named modes of the
    caller's: overrides on top of ``qualiteacher`` (e.g. other preference settings)."""
    if variants and name in variants:
        return copy.deepcopy({**MODES["qualiteacher"], **variants[name]})
    if name not in MODES:
        raise KeyError(f"unknown training mode {name!r}; known: {', '.join(MODES)} "
                       f"(groups: {', '.join(GROUPS)})")
    return copy.deepcopy(MODES[name])


def resolve_modes(names: Sequence[str], variants: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Mode names with groups expanded, duplicates dropped, order kept; unknown names raise KeyError."""
    out: list[str] = []
    for name in names:
        for mode in GROUPS.get(name, (name,)):
            mode_overrides(mode, variants)  # validates
            if mode not in out:
                out.append(mode)
    if not out:
        raise KeyError("no training mode given")
    return out


def is_conditioned(model_args: Mapping[str, Any]) -> bool:
    """Whether a stage-3 configuration trains the level dial (the full method's conditioning)."""
    return model_args.get("mode", "qualiteacher") == "qualiteacher" and bool(model_args.get("condition_on_level", True))


def mode_data_overrides(name: str, data_root: str, task: str, check: bool = True) -> dict[str, Any]:
    """The stage-3 data overrides of mode ``name`` (empty for most): the oracle's paired folder of
    the unlabeled photos' ground truth. With ``check``, a missing folder is a clear error (the demo
    data writes it; for your own data, put the real pairs under DATA/oracle/TASK/{lq,gt})."""
    out = {k: v.format(data_root=data_root, task=task) if isinstance(v, str) else v
           for k, v in MODE_DATA.get(name, {}).items()}
    root = out.get("labeled_root")
    if check and root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"mode {name!r} needs the unlabeled photos' ground truth in {root}/{{lq,gt}} "
                                f"(the demo data writes it: rebuild it with `qualiteacher data demo --overwrite`)")
    return out
