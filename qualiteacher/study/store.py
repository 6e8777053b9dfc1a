"""A study's folder: its settings, one result file per finished run (written atomically), run folders.

A run is finished exactly when its result file reads back; a study started again skips finished
runs and redoes the others (an interrupted stage-3 run resumes from its last checkpoint).
Seeds trained apart (two folders side by side, or other machines) come together with
``StudyStore.plan_merge`` / ``copy_in``: the finished runs of folders made with the same settings are copied in.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
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
        """Write a run's rows atomically (``_write_json``)."""
        path = self.result_path(key)
        _write_json(path, {"rows": [{k: _plain(v) for k, v in r.items()} for r in rows]})
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
            shown = _differences(json.loads(path.read_text()), settings, "then", "now", keys=list(settings))
            if shown:
                raise StudyMismatch(f"{self.out} holds a study made with other settings ({shown}): "
                                    f"use another --out, or the same options to resume it")
            return
        _write_json(path, settings)

    def plan_merge(self, others: Sequence[str | Path], settings: dict[str, Any]) -> dict[str, tuple[Path, list]]:
        """The finished runs of the study folders ``others`` that this one lacks: name -> (folder,
        rows). Checks only, writes nothing: each folder must hold a study made with ``settings``
        and a run found in two places must have the same rows, otherwise ``StudyMismatch``. An
        unreadable result file is reported and skipped. ``copy_in`` writes them."""
        settings = json.loads(json.dumps(settings))
        found: dict[str, tuple[Path, list]] = {}
        for other in map(Path, others):
            if other.resolve() == self.out.resolve():
                raise StudyMismatch(f"--merge {other}: that is this study's own folder")
            try:
                theirs = json.loads((other / "study.json").read_text())
            except (OSError, ValueError):
                raise StudyMismatch(f"--merge {other}: not a study folder (no readable study.json)") from None
            shown = _differences(theirs, settings, "there", "here")
            if shown:
                raise StudyMismatch(f"--merge {other}: a study made with other settings ({shown})")
            for result in sorted((other / "results").glob("*.json")):
                rows = _rows_of(result)
                if rows is None:
                    say(f"[study] {result} is unreadable: skipped")
                    continue
                name = result.stem
                before = found[name][1] if name in found else _rows_of(self.out / "results" / result.name)
                if before is not None and before != rows:
                    where = found[name][0] if name in found else self.out
                    raise StudyMismatch(f"run {name} is in {where} and in {other} with different results: "
                                        f"move one away before merging")
                if before is None:
                    found[name] = (other, rows)
        return found

    def copy_in(self, found: dict[str, tuple[Path, list]]) -> list[str]:
        """Write the runs ``plan_merge`` found (atomically, ``_write_json``) and return their names.
        Only the result files come over (the table is made from them), with the graded labeled table
        when this folder has none; checkpoints and MLflow runs stay where they were trained."""
        for name, (other, rows) in found.items():
            _write_json(self.out / "results" / f"{name}.json", {"rows": rows})
            labeled = other / "labeled_quality.csv"
            if labeled.is_file() and not (self.out / labeled.name).is_file():
                shutil.copyfile(labeled, self.out / labeled.name)
        if found:
            say(f"[study] merged {len(found)} finished run(s): {', '.join(sorted(found))}")
        return sorted(found)


def _rows_of(path: Path) -> list | None:
    """The rows of a result file as stored (None when missing, unreadable or empty)."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rows if isinstance(rows, list) and rows else None


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a kill leaves the old file or none, never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _differences(recorded: dict[str, Any], settings: dict[str, Any], old: str, new: str,
                 keys: Sequence[str] | None = None) -> str:
    """The settings among ``keys`` (default: both sides' keys) that differ between ``recorded`` and
    ``settings``, as "key: a OLD, b NEW" joined by "; " ("" when none differ)."""
    keys = sorted(set(recorded) | set(settings)) if keys is None else keys
    return "; ".join(f"{k}: {recorded.get(k)!r} {old}, {settings.get(k)!r} {new}"
                     for k in keys if recorded.get(k) != settings.get(k))
