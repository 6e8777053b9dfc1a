"""What the app runs: a trained student (and its teacher, when known) with the facts needed to
score its outputs, loaded from a stage-3 checkpoint or from the MLflow model registry."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from qualiteacher.registry import load_registered
from qualiteacher.training.restore import load_for_inference


class AppModel(NamedTuple):
    """A loaded model. ``teacher`` is ``None`` when the source holds no teacher (a registered
    student); ``iqa_preset`` / ``task`` / ``iqa_weights_dir`` build the ensemble that grades outputs."""

    student: nn.Module
    teacher: nn.Module | None
    task: str | None
    iqa_preset: str
    iqa_weights_dir: str | None
    top_level: int
    source: str          # what was loaded, in words (shown in the page)

    @property
    def has_fidelity(self) -> bool:
        return bool(getattr(self.student, "has_fidelity", False))

    @property
    def default_w(self) -> float:
        return float(getattr(self.student, "default_w", 1.0))


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says what to pass instead."""


def load_checkpoint_model(path: str | Path) -> AppModel:
    """Student, teacher and IQA settings of a stage-3 checkpoint (``OUT/stage3/final.ckpt``); nothing
    else is built (no pseudo-label bank: the checkpoint's ``bank_dir`` gets no file); non-finite
    weights are refused."""
    try:
        trained = load_for_inference(path)
    except FileNotFoundError as err:
        raise ModelLoadError(str(err)) from None
    hp = trained.hparams
    return AppModel(trained.student, trained.teacher, hp.get("task"), hp.get("iqa_preset", "offline"),
                    hp.get("iqa_weights_dir"), int(hp.get("top_level", 7)), f"checkpoint {path}")


def _split_model_uri(model_uri: str) -> tuple[str, str]:
    # models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS
    if not model_uri.startswith("models:/"):
        raise ModelLoadError(f"--model takes a registry URI such as models:/qualiteacher-dehaze/latest, got {model_uri!r}")
    rest = model_uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, "@" + alias
    name, _, version = rest.partition("/")
    return name, version or "latest"


def registry_metadata(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """Task, IQA preset and top level of a registered model, read from the pipeline that
    registered it (its runs' tags and the stage-3 run's params); empty where unknown."""
    from mlflow import MlflowClient  # lazy: mlflow takes 1.5 s to import; only --model (the registry) needs it

    client = MlflowClient(tracking_uri)
    name, version = _split_model_uri(model_uri)
    if version.startswith("@"):
        mv = client.get_model_version_by_alias(name, version[1:])
    elif version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ModelLoadError(f"no registered model named {name!r} in {tracking_uri}")
        mv = max(versions, key=lambda v: int(v.version))
    else:
        mv = client.get_model_version(name, version)
    meta: dict[str, Any] = {"task": None, "iqa_preset": None, "iqa_weights_dir": None, "top_level": None,
                            "version": mv.version}
    if name.startswith("qualiteacher-"):
        meta["task"] = name[len("qualiteacher-"):]
    if not mv.run_id:
        return meta
    run = client.get_run(mv.run_id)
    meta["task"] = run.data.tags.get("task", meta["task"])
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        stage3 = client.search_runs([run.info.experiment_id], max_results=1,
                                    filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.stage = 'stage3'")
        params = stage3[0].data.params if stage3 else {}
        meta["iqa_preset"] = params.get("model.iqa_preset")
        meta["iqa_weights_dir"] = params.get("model.iqa_weights_dir") or None
        meta["top_level"] = params.get("model.top_level")
    if meta["iqa_weights_dir"] in ("None", "null"):
        meta["iqa_weights_dir"] = None
    return meta


def load_registry_model(model_uri: str, tracking_uri: str | None = None) -> AppModel:
    """A registered student (``models:/qualiteacher-dehaze/latest``) from the MLflow registry at
    ``tracking_uri`` (default: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` here)."""
    import mlflow  # lazy: mlflow takes 1.5 s to import; only --model (the registry) needs it

    # lazy: mlflow_logger imports lightning (4 s); only --model needs the tracking URI
    from qualiteacher.tracking.mlflow_logger import tracking_uri as default_uri

    _split_model_uri(model_uri)  # a wrong kind of URI first
    uri = tracking_uri or default_uri(Path.cwd())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # asking would create an empty store here: say what to pass instead
        raise ModelLoadError(f"no MLflow store at {uri}: run the pipeline here first, pass --tracking-uri, "
                             f"or open a checkpoint with --checkpoint OUT/stage3/final.ckpt")
    mlflow.set_tracking_uri(uri)
    try:
        meta = registry_metadata(model_uri, uri)
        loaded = load_registered(model_uri)
    except ModelLoadError:
        raise
    except Exception as err:  # MLflow's RestException and friends: say which registry was asked
        raise ModelLoadError(f"cannot load {model_uri} from {uri}: {err}") from None
    # a registered object may be the bare student or a bundle with .student / .teacher
    student = getattr(loaded, "student", loaded)
    teacher = getattr(loaded, "teacher", None)
    if not isinstance(student, nn.Module):
        raise ModelLoadError(f"{model_uri} is not a restoration network (got {type(student).__name__})")
    return AppModel(student.eval(), None if teacher is None else teacher.eval(), meta["task"],
                    meta["iqa_preset"] or "offline", meta["iqa_weights_dir"], int(meta["top_level"] or 7),
                    f"{model_uri} (version {meta['version']}, {uri})")
