"""Where a pipeline config comes from: base + task + preset YAML files, user files, overrides.

``resolve_config`` merges ``configs/base.yaml``, ``configs/tasks/TASK.yaml``,
``configs/presets/PRESET.yaml``, ``configs/presets/PRESET/TASK.yaml`` (a preset's settings for one
task, when the file exists: the demo's choices made on one task's val split), the user's files and
``--key=value`` overrides in that order,
checks the result (:meth:`PipelineConfig.from_dict`) and fills the placeholders ``{task}``,
``{data_root}`` and ``{out_dir}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qualiteacher.pipeline.config import TASKS, TRAINING_STAGES, ConfigError, PipelineConfig, deep_merge

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def config_dir() -> Path:
    if not CONFIG_DIR.is_dir():
        raise ConfigError(f"configuration folder not found: {CONFIG_DIR}")
    return CONFIG_DIR


def list_config_presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "presets").glob("*.yaml"))


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
                   overrides: list[str] | None = None) -> PipelineConfig:
    """Compose ``base.yaml`` + ``tasks/TASK.yaml`` + ``presets/PRESET.yaml`` + ``presets/PRESET/TASK.yaml``
    (if present) + user files + overrides."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    root = config_dir()
    if not (root / "presets" / f"{preset}.yaml").is_file():
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(list_config_presets())}")
    raw = _read_yaml(root / "base.yaml")
    raw = deep_merge(raw, _read_yaml(root / "tasks" / f"{task}.yaml"))
    raw = deep_merge(raw, _read_yaml(root / "presets" / f"{preset}.yaml"))
    if (per_task := root / "presets" / preset / f"{task}.yaml").is_file():
        raw = deep_merge(raw, _read_yaml(per_task))
    for f in files or []:
        raw = deep_merge(raw, _read_yaml(Path(f)))
    for o in overrides or []:
        raw = deep_merge(raw, parse_override(o))
    raw["task"], raw["preset"] = task, preset
    cfg = PipelineConfig.from_dict(raw)  # unknown keys and wrong types fail here, before anything runs
    fields = {"task": task, "data_root": cfg.data_root, "out_dir": cfg.out_dir}
    fields["out_dir"] = _fill(cfg.out_dir, fields)
    filled = {s: _fill(cfg.section(s), fields) for s in TRAINING_STAGES}
    return PipelineConfig.from_dict({**cfg.to_dict(), "out_dir": fields["out_dir"], **filled})
