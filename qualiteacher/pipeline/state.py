"""``OUT/state.json``: the pipeline's MLflow run ids and which stages are done.

A finished stage is skipped on rerun; an interrupted one resumes from its last checkpoint in the
same MLflow run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
