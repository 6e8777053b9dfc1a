"""The registration stage: the final student as an MLflow model, a version of ``qualiteacher-TASK``."""
from __future__ import annotations

from pathlib import Path

from qualiteacher import console
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
    with mlflow.start_run(run_id=run_id):
        # weights as tensors + the pinned installed code, no pickle (qualiteacher.registry)
        info = log_student(module.student, dict(module.hparams), name="student", registered_model_name=name)
    console.stage_numbers("register", f"model {name} from {info.model_uri}")
