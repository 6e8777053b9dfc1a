"""Pipeline configuration: base + task + preset YAML files, user files and ``--key=value`` overrides.

A pipeline config holds pipeline-level keys (task, folders, student kind, demo data, evaluation)
and one LightningCLI section per training stage (``stage1``, ``stage2``, ``fidelity``, ``stage3``, each with
``model``, ``data``, ``trainer``). Stage sections are validated by LightningCLI against the typed
constructor signatures; pipeline-level keys against :data:`PIPELINE_KEYS`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TASKS = ("dehaze", "derain", "desnow", "lowlight")
TRAINING_STAGES = ("stage1", "stage2", "fidelity", "stage3")
STAGES = ("data", "stage1", "stage2", "fidelity", "stage3", "eval", "register")
PIPELINE_KEYS: dict[str, type | tuple[type, ...]] = {
    "task": str, "preset": str, "student": str, "out_dir": str, "data_root": str,
    "demo": dict, "eval": dict, "checkpoint_every": int, "experiment": str, "progress": bool,
    "stage1": dict, "stage2": dict, "fidelity": dict, "stage3": dict,
}


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def config_dir() -> Path:
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"configuration folder not found: {CONFIG_DIR}")
    return CONFIG_DIR


def list_config_presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "presets").glob("*.yaml"))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win; lists are replaced, not merged."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``stage3.model.w_pref=0.5`` → ``{"stage3": {"model": {"w_pref": 0.5}}}`` (value parsed as YAML)."""
    key, sep, raw = text.lstrip("-").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    value = yaml.safe_load(raw) if raw != "" else None
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _fill(value: Any, fields: dict[str, str]) -> Any:
    # placeholders {task}, {data_root}, {out_dir} in every string of the stage sections
    if isinstance(value, str):
        try:
            return value.format(**fields)
        except (KeyError, IndexError) as err:
            raise ConfigError(f"unknown placeholder {err} in config value {value!r}; "
                              f"known: {', '.join('{' + k + '}' for k in fields)}") from err
    if isinstance(value, dict):
        return {k: _fill(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fields) for v in value]
    return value


def resolve_config(task: str, preset: str = "demo", files: list[str] | None = None,
                   overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose ``base.yaml`` + ``tasks/TASK.yaml`` + ``presets/PRESET.yaml`` + user files + overrides."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    root = config_dir()
    if not (root / "presets" / f"{preset}.yaml").is_file():
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(list_config_presets())}")
    cfg = _read_yaml(root / "base.yaml")
    cfg = deep_merge(cfg, _read_yaml(root / "tasks" / f"{task}.yaml"))
    cfg = deep_merge(cfg, _read_yaml(root / "presets" / f"{preset}.yaml"))
    for f in files or []:
        cfg = deep_merge(cfg, _read_yaml(Path(f)))
    for o in overrides or []:
        cfg = deep_merge(cfg, parse_override(o))
    cfg["task"], cfg["preset"] = task, preset
    unknown = sorted(set(cfg) - set(PIPELINE_KEYS))
    if unknown:
        raise ConfigError(f"unknown pipeline key(s) {unknown}; known: {sorted(PIPELINE_KEYS)}")
    for k, typ in PIPELINE_KEYS.items():
        if k in cfg and cfg[k] is not None and not isinstance(cfg[k], typ):
            raise ConfigError(f"pipeline key {k!r} must be {getattr(typ, '__name__', typ)}, got {cfg[k]!r}")
    if cfg.get("student") not in ("iqpir", "unet"):
        raise ConfigError(f"pipeline key 'student' must be 'iqpir' or 'unet', got {cfg.get('student')!r}")
    fields = {"task": task, "data_root": str(cfg["data_root"]), "out_dir": str(cfg["out_dir"])}
    cfg["out_dir"] = _fill(cfg["out_dir"], fields)
    fields["out_dir"] = cfg["out_dir"]
    for stage in TRAINING_STAGES:
        cfg[stage] = _fill(cfg.get(stage, {}), fields)
        extra = sorted(set(cfg[stage]) - {"model", "data", "trainer"})
        if extra:
            raise ConfigError(f"unknown key(s) {[f'{stage}.{k}' for k in extra]}: a stage section "
                              f"holds only model, data and trainer")
    return cfg
