"""A study's folder: its settings, one result file per finished run (written atomically), run folders.

A run is finished exactly when its result file reads back; a study started again skips finished
runs and redoes the others (an interrupted stage-3 run resumes from its last checkpoint).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qualiteacher.say import say


class StudyMismatch(ValueError):
    """The study folder holds results made with other settings."""


@dataclass(frozen=True)
class RunKey:
    """One trained (or evaluated) thing of a study: a mode at a seed (``warmup`` for the shared start)."""

    mode: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}-seed{self.seed}"


def _plain(value: Any) -> Any:
    # JSON-safe scalars (numpy types, NaN as null)
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class StudyStore:
    """Files of a study under ``out``: ``study.json`` (settings), ``results/NAME.json`` (rows of a
    finished run), ``runs/NAME/`` (its training folder), ``seed<S>/warmup/`` (shared warm-up)."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)

    def run_dir(self, key: RunKey) -> Path:
        return self.out / "runs" / key.name

    def warmup_dir(self, seed: int) -> Path:
        return self.out / f"seed{seed}" / "warmup"

    def result_path(self, key: RunKey) -> Path:
        return self.out / "results" / f"{key.name}.json"

    def read(self, key: RunKey) -> list[dict[str, Any]] | None:
        """The rows of a finished run; None when it has not finished (or its file is unreadable)."""
        path = self.result_path(key)
        if not path.is_file():
            return None
        try:
            rows = json.loads(path.read_text())["rows"]
        except (ValueError, KeyError, TypeError):
            say(f"[study] {path} is unreadable: {key.name} runs again")
            return None
        return [{k: (float("nan") if v is None else v) for k, v in r.items()} for r in rows]

    def write(self, key: RunKey, rows: list[dict[str, Any]]) -> Path:
        """Write a run's rows atomically (a kill leaves the old file or none, never half a file)."""
        path = self.result_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"rows": [{k: _plain(v) for k, v in r.items()} for r in rows]}, indent=1))
        os.replace(tmp, path)
        return path

    def rows(self, keys: list[RunKey]) -> pd.DataFrame:
        """Rows of the finished runs among ``keys``, in that order."""
        rows = [r for key in keys for r in (self.read(key) or [])]
        return pd.DataFrame(rows)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Record ``settings`` on the first start; later starts must match them."""
        path = self.out / "study.json"
        settings = json.loads(json.dumps(settings))
        if path.is_file():
            before = json.loads(path.read_text())
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            if diff:
                shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
                raise StudyMismatch(f"{self.out} holds a study made with other settings ({shown}): "
                                    f"use another --out, or the same options to resume it")
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, path)
