"""One MLflow parent run per pipeline, one child run per stage, reused on resume.

Every write goes through a :class:`~qualiteacher.tracking.journal.JournaledClient`: a store that
cannot be written mid-run costs a line on stderr, never a metric (``OUT/tracking/journal.jsonl``
keeps them until the store takes them, at the latest when the pipeline runs again).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from qualiteacher.say import say
from qualiteacher.tracking.journal import (
    JOURNAL_DIR,
    JournaledClient,
    TrackingJournal,
    error_summary,
    quiet_store_errors,
)
from qualiteacher.tracking.mlflow_logger import (
    TrackingUnavailableError,
    _flatten,
    check_tracking_uri,
    ensure_experiment,
    tracking_uri,
)


class PipelineRuns:
    """Creates or reopens the runs recorded in the pipeline state (``state.data``)."""

    def __init__(self, cfg: dict[str, Any], state: Any, workdir: Path, commit: str) -> None:
        from mlflow import MlflowClient  # lazy: mlflow takes 1.5 s to import; it loads when a run is first opened

        self.cfg, self.state, self.commit = cfg, state, commit
        self.uri = tracking_uri(workdir)
        check_tracking_uri(self.uri)  # seconds and one clear line, not minutes of retries
        journal = TrackingJournal(Path(state.path).parent / JOURNAL_DIR)
        self.client = JournaledClient(MlflowClient(self.uri), journal, self.uri)
        self.experiment_id = ensure_experiment(self.client, cfg.get("experiment", "qualiteacher"), workdir)
        self.client.drain()  # writes an earlier run kept while the store could not take them
        self.tags = {"task": cfg["task"], "preset": cfg["preset"], "student": cfg["student"],
                     "git_commit": commit, "mlflow.source.git.commit": commit}

    def _reopen(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # the store was deleted or moved: start afresh
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    @property
    def parent_id(self) -> str:
        return self.state.data["parent_run_id"]

    def start_parent(self) -> str:
        run_id = self._reopen(self.state.data.get("parent_run_id"))
        if run_id is None:
            run = self._create_run("the pipeline's run", tags=self.tags,
                                   run_name=f"{self.cfg['task']}-{self.cfg['preset']}")
            run_id = run.info.run_id
            self.state.data["parent_run_id"] = run_id
            self.state.save()
            flat = {k: v for k, v in _flatten({k: v for k, v in self.cfg.items()
                                               if k not in ("stage1", "stage2", "fidelity", "stage3")}).items()}
            self.log_params(run_id, flat)
            self.log_dict_artifact(run_id, self.cfg, "config.yaml")

        say(f"[mlflow] tracking at {self.uri} · parent run {run_id}")
        return run_id

    def child(self, stage: str) -> str:
        """The stage's child run (created once, reopened on resume)."""
        entry = self.state.stage(stage)
        run_id = self._reopen(entry.get("run_id"))
        if run_id is None:
            run = self._create_run(f"the run of stage {stage}", run_name=f"{self.cfg['task']}-{stage}",
                                   tags={**self.tags, "stage": stage, "mlflow.parentRunId": self.parent_id})
            run_id = run.info.run_id
            entry["run_id"] = run_id
            self.state.save()
        return run_id

    def _create_run(self, what: str, **kwargs: Any) -> Any:
        try:
            with quiet_store_errors():
                return self.client.create_run(self.experiment_id, **kwargs)
        except Exception as err:  # noqa: BLE001  the store cannot be written: one line, nothing lost
            raise TrackingUnavailableError(
                f"MLflow store {self.uri} cannot be written ({error_summary(err)}): {what} was not created, so the "
                f"pipeline stops here; finished stages are kept and the writes waiting in "
                f"{self.client.journal.path} are sent when you rerun the same command once the store is "
                f"writable") from None

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Parameters not logged before (one logged earlier is left alone)."""
        from mlflow.entities import Param  # lazy: mlflow, see the first import of this module

        self.client.log_batch(run_id, params=[Param(k[:250], str(v)[:6000]) for k, v in params.items()])

    def log_dict_artifact(self, run_id: str, data: dict[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            self.client.log_artifact(run_id, str(path))

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    def fail_stage(self, stage: str, err: BaseException) -> None:
        """Mark the run of a stage that raised ``err``, and the parent run, FAILED (KILLED for an
        interrupt), so the MLflow UI never shows a crashed pipeline as RUNNING. Best effort: a
        tracking error here never hides ``err``."""
        if isinstance(err, SystemExit) and err.code in (0, None):
            return  # a DDP worker rank leaving normally
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        ids = [self.state.stage(stage).get("run_id"), self.state.data.get("parent_run_id")]
        for run_id in [i for i in ids if i]:
            try:
                self.client.set_tag(run_id, "error", f"{stage}: {type(err).__name__}: {err}"[:5000])
                self.client.set_terminated(run_id, status)
            except Exception:  # noqa: BLE001  the store itself may be the problem
                pass

    def end_parent(self) -> None:
        self.finish(self.parent_id)

    def close(self) -> int:
        """Send the writes that wait (one line if some still do); returns how many wait."""
        return self.client.close()
