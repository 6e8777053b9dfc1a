"""MLflow tracking glue: embedded store by default, parent/child runs, a resumable step logger."""
from qualiteacher.tracking.mlflow_logger import FlushBeforeCheckpoint, MlflowStepLogger, ensure_experiment, tracking_uri

__all__ = ["FlushBeforeCheckpoint", "MlflowStepLogger", "ensure_experiment", "tracking_uri"]
