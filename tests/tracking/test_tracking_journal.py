"""Fault injection into the MLflow store (qualiteacher/tracking/journal.py): writes made while the
store cannot be written reach it once it can, none lost, none doubled, the run FINISHED only then,
a few lines of stderr per fault, and a kill in between changes none of that."""
import logging

import pytest
from mlflow import MlflowClient

from qualiteacher.tracking.journal import JournaledClient, TrackingJournal
from qualiteacher.tracking.mlflow_logger import MlflowStepLogger


class FaultyStore:
    """An MlflowClient whose writes fail while ``down`` (``ambiguous``: the write reaches the store,
    then the call fails anyway, as a server that dies before it answers)."""

    WRITES = ("log_batch", "log_artifact", "log_image", "set_terminated", "update_run", "create_run")

    def __init__(self, client: MlflowClient) -> None:
        self.client, self.down, self.ambiguous, self.failed = client, False, False, 0

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if name not in self.WRITES:
            return attr

        def write(*args, **kwargs):
            if self.down:
                if self.ambiguous:
                    attr(*args, **kwargs)
                self.failed += 1
                raise OSError("(sqlite3.OperationalError) attempt to write a readonly database\n[SQL: INSERT ...]")
            return attr(*args, **kwargs)

        return write


@pytest.fixture()
def store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("journal")).info.run_id
    return client, run_id


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _logger(faulty, journal_dir, run_id, uri="sqlite:///store"):
    client = JournaledClient(faulty, TrackingJournal(journal_dir), uri, retry_s=0.0)
    return client, MlflowStepLogger(uri, run_id, flush_every=1, client=client)


@pytest.mark.parametrize("ambiguous", [False, True])
def test_metrics_written_while_the_store_is_down_arrive_once(tmp_path, store, caplog, ambiguous):
    client, run_id = store
    faulty = FaultyStore(client)
    journaled, logger = _logger(faulty, tmp_path / "tracking", run_id)
    with caplog.at_level(logging.WARNING):
        for step in range(100):
            faulty.down, faulty.ambiguous = 20 <= step < 80, ambiguous
            logger.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
            logger.save()
        journaled.set_terminated(run_id, "FINISHED")
        logger.finalize("success")
        assert journaled.close() == 0
    assert faulty.failed >= 60
    for key in ("loss", "lr"):
        assert _steps(client, run_id, key) == list(range(100))  # none lost, none doubled
    assert client.get_run(run_id).info.status == "FINISHED"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 3 and "readonly database" in warnings[0].getMessage()  # one fault, one recovery
    assert not (tmp_path / "tracking" / "journal.jsonl").exists()  # all sent: the journal is gone


def test_a_kill_while_the_store_is_down_loses_nothing_and_finishes_nothing(tmp_path, store, caplog):
    client, run_id = store
    faulty = FaultyStore(client)
    journaled, logger = _logger(faulty, tmp_path / "tracking", run_id)
    for step in range(30):
        faulty.down = step >= 10
        logger.log_metrics({"loss": float(step)}, step=step)
        logger.save()  # what FlushBeforeCheckpoint does before every checkpoint
    journaled.set_terminated(run_id, "FINISHED")
    journaled.log_artifact(run_id, str(_tmp_file(tmp_path)), "eval")
    with caplog.at_level(logging.WARNING):
        assert journaled.close() > 0
    assert "still wait" in caplog.text
    assert _steps(client, run_id, "loss") == list(range(10))
    assert client.get_run(run_id).info.status == "RUNNING"  # never FINISHED while metrics are missing
    # the process dies here (nothing more is called); the next run in the folder, the store back:
    again = JournaledClient(MlflowClient(client.tracking_uri), TrackingJournal(tmp_path / "tracking"))
    assert again.metric_last_step(run_id, "loss") == 29  # a resumed logger writes no step twice
    assert again.drain() == 0
    assert _steps(client, run_id, "loss") == list(range(30))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/results.csv"]


def _tmp_file(tmp_path):
    # a temporary file (gone by the time the journal is replayed): the journal keeps a copy
    import tempfile

    folder = tempfile.mkdtemp(dir=tmp_path.parent)  # outside the journal's output folder
    path = __import__("pathlib").Path(folder) / "results.csv"
    path.write_text("a,b\n1,2\n")
    return path


def test_a_read_only_artifact_store_holds_back_artifacts_not_metrics(tmp_path, store):
    client, run_id = store

    class NoArtifacts(FaultyStore):
        WRITES = ("log_artifact",)

    faulty = NoArtifacts(client)
    faulty.down = True
    journaled = JournaledClient(faulty, TrackingJournal(tmp_path / "tracking"), retry_s=0.0)
    journaled.log_artifact(run_id, str(_tmp_file(tmp_path)), "eval")
    journaled.log_metric(run_id, "psnr", 21.5, step=0)         # goes straight in
    journaled.set_terminated(run_id, "FINISHED")               # waits behind the artifact
    assert _steps(client, run_id, "psnr") == [0]
    assert client.get_run(run_id).info.status == "RUNNING"
    faulty.down = False
    assert journaled.close() == 0
    assert client.get_run(run_id).info.status == "FINISHED" and client.list_artifacts(run_id, "eval")
