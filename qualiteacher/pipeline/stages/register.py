"""The registration stage: the final student as an MLflow model, a version of ``qualiteacher-TASK``."""
from __future__ import annotations

from pathlib import Path

from qualiteacher import console
from qualiteacher.tracking.journal import error_summary, quiet_store_errors
from qualiteacher.tracking.mlflow_logger import TrackingUnavailableError
from qualiteacher.tracking.runs import PipelineRuns


def register_student(final: Path, task: str, runs: PipelineRuns, run_id: str) -> None:
    """Log the student of the stage-3 checkpoint ``final`` as an MLflow model in run ``run_id`` and
    register a version named after the task."""
    # lazy: MLflow's model flavours and the registry code load only for this stage
    import mlflow

    from qualiteacher.registry import log_student
    from qualiteacher.training.stage3 import load_trained

    module = load_trained(final)
    name = f"qualiteacher-{task}"
    mlflow.set_tracking_uri(runs.uri)
    try:
        with quiet_store_errors(), mlflow.start_run(run_id=run_id):
            # weights as tensors + the pinned installed code, no pickle (qualiteacher.registry)
            info = log_student(module.student, dict(module.hparams), name="student", registered_model_name=name)
    except Exception as err:  # noqa: BLE001  an unwritable artifact store or registry: one line
        raise TrackingUnavailableError(f"register: the student of {final} could not be logged to MLflow "
                                       f"({error_summary(err)}); every other stage is done: rerun the same "
                                       f"command once the store and its artifacts folder are writable") from None
    console.stage_numbers("register", f"model {name} from {info.model_uri}")
