"""MLflow tracking: an embedded store by default, a Lightning logger that survives resumes."""
from __future__ import annotations

import math
import os
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


def tracking_uri(workdir: str | Path = ".") -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store ``mlflow.db`` in ``workdir``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def ensure_experiment(client: Any, name: str, workdir: str | Path = ".") -> str:
    """Id of experiment ``name``, created with artifacts under ``workdir/mlartifacts`` for the
    embedded store (a remote server keeps its own artifact location)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (Path(workdir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowStepLogger(Logger):
    """Logs a Lightning stage into an existing MLflow run (the stage's child run).

    Metrics are buffered and written in batches (flush every ``flush_every`` steps and before
    every checkpoint, via :class:`FlushBeforeCheckpoint`). On a resumed run, steps that MLflow
    already holds for a metric are not written again, so a run killed and restarted has no
    duplicated steps; flushing before each checkpoint means none are missing either.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 20) -> None:
        super().__init__()
        self._uri = tracking_uri
        self._run_id = run_id
        self._flush_every = flush_every
        self._buffer: list[Any] = []
        self._last_step: dict[str, int] = {}
        self._client: Any = None

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self._run_id

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self._uri)
        return self._client

    def _already_logged(self, key: str) -> int:
        if key not in self._last_step:
            history = self.experiment.get_metric_history(self._run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        step = int(step or 0)
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            value = float(value)
            if key == "epoch" or math.isnan(value) or step <= self._already_logged(key):
                continue
            self._last_step[key] = step
            self._buffer.append(Metric(key, value, now, step))
        if step % self._flush_every == 0:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Write the buffered metrics to MLflow."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:900], self._buffer[900:]
            self.experiment.log_batch(self._run_id, metrics=chunk)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from mlflow.entities import Param

        params = vars(params) if isinstance(params, Namespace) else dict(params)
        flat = _flatten(params)
        existing = self.experiment.get_run(self._run_id).data.params
        new = [Param(k[:250], str(v)[:6000]) for k, v in flat.items() if k[:250] not in existing]
        for i in range(0, len(new), 90):
            self.experiment.log_batch(self._run_id, params=new[i:i + 90])

    @rank_zero_only
    def save(self) -> None:
        self.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()


class FlushBeforeCheckpoint(L.Callback):
    """Writes buffered metrics before a checkpoint, so a resume never misses logged steps."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MlflowStepLogger):
                logger.flush()
