"""MLflow tracking: an embedded store by default, a Lightning logger that survives resumes."""
from __future__ import annotations

import logging
import math
import os
import time
import urllib.error
import urllib.request
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class TrackingUnavailableError(ConnectionError):
    """The MLflow tracking store cannot be reached or written; the message says what to do."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Pre-flight check of a tracking URI, done before any work: an HTTP server must answer
    within ``timeout`` seconds as an MLflow server does (``/health`` or the REST API; 401/403
    count: authentication), a SQLite store's folder must exist and be writable. Raises :class:`TrackingUnavailableError` with one clear message
    instead of MLflow's minutes of retries. Other schemes (databricks, ...) are not checked.

    For an HTTP server it also caps MLflow's own retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 2,
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 30 s) unless they are set, so a server that goes away later
    costs seconds per call, not minutes.
    """
    parsed = urlparse(uri)
    fix = "start the server, or unset MLFLOW_TRACKING_URI to use the embedded store mlflow.db"
    if parsed.scheme in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        status = None
        for route in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            try:
                with urllib.request.urlopen(uri.rstrip("/") + route, timeout=timeout):
                    return
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    return  # an MLflow server behind authentication: it is there
                status = err.code  # e.g. 404 from something that is not an MLflow server
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", err)
                raise TrackingUnavailableError(f"MLflow tracking server {uri} is not reachable ({reason}; "
                                               f"checked with a {timeout:g}-s timeout): {fix}") from None
        raise TrackingUnavailableError(f"{uri} answers (HTTP {status}) but is not an MLflow tracking server: {fix}")
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        folder = Path(path).parent if path and path != ":memory:" else None
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise TrackingUnavailableError(f"MLflow store {uri}: folder {folder} is missing or not writable")


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
    every checkpoint, via :class:`FlushBeforeCheckpoint`). On a resumed run, steps that MLflow (or
    the tracking journal) already holds for a metric are not written again, so a run killed and
    restarted has no duplicated steps; flushing before each checkpoint means none are missing either.

    Tracking never ends training: with the pipeline's ``client`` (a
    :class:`~qualiteacher.tracking.journal.JournaledClient`) a write the store refuses waits in the
    journal, durably, until the store takes it. A plain ``MlflowClient`` (the default) keeps failed
    writes in memory and retries them at the next flush.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 20, client: Any = None) -> None:
        super().__init__()
        self._uri = tracking_uri
        self._run_id = run_id
        self._flush_every = flush_every
        self._failures = 0      # flushes that failed since the last success (plain client only)
        self._buffer: list[Any] = []
        self._last_step: dict[str, int] = {}
        self._client: Any = client

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
            from mlflow import MlflowClient  # lazy: mlflow takes 1.5 s to import; it loads when a run is first logged

            self._client = MlflowClient(self._uri)
        return self._client

    def _already_logged(self, key: str) -> int:
        if key not in self._last_step:
            client = self.experiment
            if hasattr(client, "metric_last_step"):
                self._last_step[key] = client.metric_last_step(self._run_id, key)
            else:
                try:
                    history = client.get_metric_history(self._run_id, key)
                except Exception as err:  # noqa: BLE001  tracking never ends training
                    self._warn("reading metric history", err)
                    history = []
                self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    def _warn(self, what: str, err: BaseException) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning("MLflow %s failed (%s: %s); training goes on, metrics stay buffered and are retried",
                        what, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric  # lazy: mlflow, see MlflowStepLogger.experiment

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
        """Write the buffered metrics (a journaled client keeps what the store refuses)."""
        while self._buffer:
            chunk = self._buffer[:900]
            try:
                self.experiment.log_batch(self._run_id, metrics=chunk)
            except Exception as err:  # noqa: BLE001  a plain client: keep them for the next flush
                self._warn("metric logging", err)
                return
            self._buffer = self._buffer[900:]
            if self._failures:
                log.warning("MLflow metric logging works again after %d failed attempt(s)", self._failures)
                self._failures = 0

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from mlflow.entities import Param  # lazy: mlflow, see MlflowStepLogger.experiment

        params = vars(params) if isinstance(params, Namespace) else dict(params)
        flat = _flatten(params)
        try:
            existing = self.experiment.get_run(self._run_id).data.params
            new = [Param(k[:250], str(v)[:6000]) for k, v in flat.items() if k[:250] not in existing]
            for i in range(0, len(new), 90):
                self.experiment.log_batch(self._run_id, params=new[i:i + 90])
        except Exception as err:  # noqa: BLE001  tracking never ends training
            self._warn("parameter logging", err)

    @rank_zero_only
    def save(self) -> None:
        self.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()
        if self._buffer:
            log.warning("MLflow: %d metric value(s) of run %s could not be written (store unreachable); "
                        "the checkpoints hold the trained weights", len(self._buffer), self._run_id)


class FlushBeforeCheckpoint(L.Callback):
    """Writes buffered metrics before a checkpoint, so a resume never misses logged steps."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MlflowStepLogger):
                logger.flush()
