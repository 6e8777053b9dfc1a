"""A durable journal of MLflow writes: tracking faults lose nothing, double nothing, end nothing.

:class:`JournaledClient` stands in for an ``MlflowClient`` wherever the pipeline writes (metrics,
parameters, tags, artifacts, run status; reads go straight through). A write that fails (a store
that became read-only, a server that went away, a full disk) is appended to
``OUT/tracking/journal.jsonl`` (fsynced) and the run goes on; later writes of the same kind queue
behind it, so their order is kept. The journal is sent again after ``retry_s`` seconds (doubling
while the store stays faulty, up to 5 min), when the pipeline ends and when it starts again
(:meth:`JournaledClient.drain`):

* none lost: a journaled write stays until the store took it (artifacts of temporary files are
  copied into ``OUT/tracking/files`` first);
* none doubled: a replayed metric whose step MLflow already holds for that key is left out (a
  write that failed after the store had taken it);
* a run is not marked FINISHED while any of its writes waits: the status change waits behind them;
* stderr: one line when a fault starts, one when the store takes writes again, one at the end if
  writes still wait. MLflow's own multi-page SQL error logs are left out (the fault is reported
  here, once).

Artifact writes and the other writes queue separately: a read-only artifact store holds back
artifacts (and the FINISHED status of their runs), not metrics.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

JOURNAL_DIR = "tracking"
MAX_RETRY_S = 300.0
_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "alembic")


@contextlib.contextmanager
def quiet_store_errors() -> Iterator[None]:
    # MLflow logs a failed SQL write as ERROR with the statement, its parameters and a traceback
    # (thousands of lines over a run); the caller reports the fault once instead
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def error_summary(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = next((ln for ln in lines if "Error)" in ln or "Error:" in ln), lines[0] if lines else "")
    return f"{type(err).__name__}: {text[:200]}"


def _channel(op: dict[str, Any]) -> str:
    return "artifact" if op["op"] == "log_artifact" else "store"


class TrackingJournal:
    """The pending writes of one output folder: ``journal.jsonl`` (one JSON op per line, appended
    and fsynced) and ``journal.done`` (sequence numbers sent since). Both go once all are sent."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "journal.jsonl"
        self._done_path = self.folder / "journal.done"
        self.ops: list[dict[str, Any]] = []
        self.done: set[int] = set()
        self._waiting: dict[str, int] = {}  # "" (all), channel, "run:<id>" -> pending writes
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self.ops.append(json.loads(line))
                except ValueError:  # a line cut short by a kill: it was never acknowledged
                    continue
            if self._done_path.is_file():
                self.done = set(json.loads(self._done_path.read_text() or "[]"))
        for op in self.pending():
            self._count(op, 1)

    def _count(self, op: dict[str, Any], change: int) -> None:
        for key in ("", _channel(op), f"run:{op['run']}"):
            self._waiting[key] = self._waiting.get(key, 0) + change

    def waiting(self, channel: str = "", run_id: str | None = None) -> int:
        """How many writes wait (of one channel, or of one run)."""
        return self._waiting.get(f"run:{run_id}" if run_id else channel, 0)

    def pending(self, channel: str | None = None, run_id: str | None = None) -> list[dict[str, Any]]:
        return [op for op in self.ops if op["seq"] not in self.done
                and (channel is None or _channel(op) == channel) and (run_id is None or op["run"] == run_id)]

    def append(self, op: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if op["op"] == "log_artifact":  # a file that may vanish (a temporary one): keep a copy
            src = Path(op["path"])
            if not src.resolve().is_relative_to(self.folder.parent.resolve()):
                keep = self.keep_path(src.name)
                shutil.copy2(src, keep)
                op["path"] = str(keep)
        op["seq"] = (self.ops[-1]["seq"] + 1) if self.ops else 0
        with open(self.path, "a") as fh:
            fh.write(json.dumps(op) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.ops.append(op)
        self._count(op, 1)

    def keep_path(self, name: str) -> Path:
        """A new place for a file the journal keeps (its artifact name unchanged)."""
        folder = self.folder / "files" / str(time.time_ns())
        folder.mkdir(parents=True)
        return folder / name

    def mark_done(self, op: dict[str, Any]) -> None:
        self.done.add(op["seq"])
        self._count(op, -1)
        if not self.waiting():  # all sent: start afresh
            for path in (self.path, self._done_path):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.folder / "files", ignore_errors=True)
            self.ops, self.done, self._waiting = [], set(), {}
            return
        tmp = self._done_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(self.done)))
        os.replace(tmp, self._done_path)

    def last_steps(self, run_id: str) -> dict[str, int]:
        """Highest pending step of every metric key of ``run_id``."""
        out: dict[str, int] = {}
        for op in self.pending("store", run_id):
            for key, _value, _ts, step in op.get("metrics", ()):
                out[key] = max(out.get(key, -1), int(step))
        return out


class JournaledClient:
    """An ``MlflowClient`` whose writes never raise: a failed one waits in a :class:`TrackingJournal`
    (see the module doc). Anything else is the wrapped client's."""

    def __init__(self, client: Any, journal: TrackingJournal, uri: str = "", retry_s: float = 10.0) -> None:
        self._client, self.journal, self.uri, self.retry_s = client, journal, uri, retry_s
        self._faulty = False
        self._last_try = 0.0
        self._wait_s = retry_s  # doubles after each failed retry (at most MAX_RETRY_S): a server that
        # went away costs its timeout now and then, not at every step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    # ------------------------------------------------------------------ writes
    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), **_: Any) -> None:
        self._write({"op": "log_batch", "run": run_id,
                     "metrics": [[m.key, float(m.value), int(m.timestamp), int(m.step)] for m in metrics],
                     "params": [[p.key, str(p.value)] for p in params],
                     "tags": [[t.key, str(t.value)] for t in tags]})

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None,
                   step: int | None = None, **_: Any) -> None:
        self._write({"op": "log_batch", "run": run_id, "params": [], "tags": [],
                     "metrics": [[key, float(value), int(timestamp or time.time() * 1000), int(step or 0)]]})

    def log_param(self, run_id: str, key: str, value: Any, **_: Any) -> None:
        self._write({"op": "log_batch", "run": run_id, "metrics": [], "tags": [], "params": [[key, str(value)]]})

    def set_tag(self, run_id: str, key: str, value: Any, **_: Any) -> None:
        self._write({"op": "log_batch", "run": run_id, "metrics": [], "params": [], "tags": [[key, str(value)]]})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._write({"op": "log_artifact", "run": run_id, "path": str(local_path), "dir": artifact_path})

    def log_image(self, run_id: str, image: Any, artifact_file: str | None = None, **kwargs: Any) -> None:
        try:
            with quiet_store_errors():
                if self.journal.waiting("artifact"):
                    raise RuntimeError("earlier artifacts still wait")
                self._client.log_image(run_id, image, artifact_file=artifact_file, **kwargs)
        except Exception as err:  # noqa: BLE001  kept as a file, sent with the other artifacts
            self._fault(err)
            name = Path(artifact_file or "image.png")
            keep = self.journal.keep_path(name.name)
            (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(keep)
            parent = str(name.parent) if str(name.parent) != "." else None
            self.journal.append({"op": "log_artifact", "run": run_id, "path": str(keep), "dir": parent})

    def set_terminated(self, run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
        self._write({"op": "set_terminated", "run": run_id, "status": status})

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self._write({"op": "update_run", "run": run_id, "status": status, "name": name})

    def metric_last_step(self, run_id: str, key: str) -> int:
        """Highest step of ``key`` in ``run_id``: what MLflow holds or the journal still holds."""
        try:
            with quiet_store_errors():
                held = max((m.step for m in self._client.get_metric_history(run_id, key)), default=-1)
        except Exception as err:  # noqa: BLE001  an unreadable store: the journal alone
            self._fault(err)
            held = -1
        return max(held, self.journal.last_steps(run_id).get(key, -1))

    # ------------------------------------------------------------------ the journal
    def _blocked(self, op: dict[str, Any]) -> bool:
        if op["op"] == "set_terminated":  # never FINISHED while a write of the run waits
            return bool(self.journal.waiting(run_id=op["run"]))
        return bool(self.journal.waiting(_channel(op)))

    def _write(self, op: dict[str, Any]) -> None:
        if self.journal.waiting():
            self.drain(force=False)
        if not self._blocked(op):
            try:
                with quiet_store_errors():
                    self._send(op, None)
                return
            except Exception as err:  # noqa: BLE001  tracking never ends the run
                self._fault(err)
        self.journal.append(op)

    def _send(self, op: dict[str, Any], held: dict[tuple[str, str], int] | None) -> None:
        c = self._client
        if op["op"] == "log_batch":
            # lazy: mlflow takes 1.5 s to import; only replaying the journal into a store needs it
            from mlflow.entities import Metric, Param, RunTag

            rows = op["metrics"]
            if held is not None:  # a replay: leave out steps MLflow holds already (never doubled)
                for key in {r[0] for r in rows} - {k for (run, k) in held if run == op["run"]}:
                    held[(op["run"], key)] = max((m.step for m in c.get_metric_history(op["run"], key)), default=-1)
                rows = [r for r in rows if r[3] > held[(op["run"], r[0])]]
            if op["params"]:  # a parameter is written once: one logged before is left alone
                have = c.get_run(op["run"]).data.params
                op = {**op, "params": [p for p in op["params"] if p[0] not in have]}
            # MLflow takes at most 1000 metrics, 100 parameters and 100 tags per call
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in rows]
            params = [Param(k[:250], v[:6000]) for k, v in op["params"]]
            tags = [RunTag(k, v) for k, v in op["tags"]]
            calls = max(-(-len(metrics) // 900), -(-len(params) // 90), -(-len(tags) // 90), 1)
            for j in range(calls):
                c.log_batch(op["run"], metrics=metrics[j * 900:(j + 1) * 900], params=params[j * 90:(j + 1) * 90],
                            tags=tags[j * 90:(j + 1) * 90])
            if held is not None:
                for key, _v, _ts, step in rows:
                    held[(op["run"], key)] = max(held[(op["run"], key)], step)
        elif op["op"] == "log_artifact":
            c.log_artifact(op["run"], op["path"], op["dir"])
        elif op["op"] == "set_terminated":
            c.set_terminated(op["run"], op["status"])
        elif op["op"] == "update_run":
            c.update_run(op["run"], status=op["status"], name=op["name"])
        else:
            raise ValueError(f"unknown journal op {op['op']!r}")

    def drain(self, force: bool = True) -> int:
        """Send what the journal holds, in order per kind (at most every ``retry_s`` seconds unless
        ``force``); returns how many writes still wait."""
        if not self.journal.waiting() or (not force and time.monotonic() - self._last_try < self._wait_s):
            return self.journal.waiting()
        pending = self.journal.pending()
        self._last_try = time.monotonic()
        failed: set[str] = set()
        held: dict[tuple[str, str], int] = {}
        sent = 0
        for op in pending:
            if _channel(op) in failed or (op["op"] == "set_terminated" and any(
                    p["run"] == op["run"] and p["seq"] < op["seq"] and p["seq"] not in self.journal.done
                    for p in pending)):
                continue
            try:
                with quiet_store_errors():
                    self._send(op, held)
            except Exception as err:  # noqa: BLE001  still faulty: try again later
                failed.add(_channel(op))
                self._fault(err)
                continue
            self.journal.mark_done(op)
            sent += 1
        left = self.journal.waiting()
        self._wait_s = min(self._wait_s * 2, MAX_RETRY_S) if failed else self.retry_s
        if sent and not failed and self._faulty:
            log.warning("MLflow %s takes writes again: %d kept write(s) sent", self.uri, sent)
            self._faulty = False
        return left

    def _fault(self, err: BaseException) -> None:
        if not self._faulty:
            self._faulty = True
            log.warning("MLflow write to %s (or its artifact store) failed (%s); the run goes on and every "
                        "tracking write is kept in %s until the store takes it", self.uri, error_summary(err),
                        self.journal.path)

    def close(self) -> int:
        """Send what waits; one line if some still does. Returns how many wait."""
        left = self.drain(force=True)
        if left:
            log.warning("MLflow: %d tracking write(s) still wait in %s (%s or its artifact store cannot be "
                        "written); the next run in this folder sends them, and its MLflow runs stay unfinished "
                        "until then", left, self.journal.path, self.uri)
        return left
