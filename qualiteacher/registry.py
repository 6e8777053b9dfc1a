"""The trained student as an MLflow model that holds no pickle: weights as tensors, code pinned.

A logged student is an MLflow ``python_function`` model whose data folder (``data/student``) holds

- ``student.json``: how to build it (student kind, architecture preset, conditioning, fidelity
  settings, number of levels) and the versions it was trained with;
- ``weights.pt``: its ``state_dict``, tensors only, read back with ``weights_only=True`` and a
  strict key check (see ``qualiteacher.checkpoints``).

The model's ``loader_module`` is this module: the code comes from the installed ``qualiteacher``
package, pinned (with ``torch``) in the model's requirements, never from the artifact store, so
whoever can write the store cannot make a loader run code. Two ways back:

- :func:`load_registered` (``models:/qualiteacher-dehaze/1``) returns the student module itself,
  ready to call as ``student(x, level, w=None)`` (what ``restore`` and the app use);
- ``mlflow.pyfunc.load_model(uri).predict({"image": (B,3,H,W) float32 in [0,1], "level": (B,)
  int64, "w": (B,) float32})`` returns the restored images (B,3,H,W) float32; ``w`` is the
  fidelity weight of students that have one (``has_fidelity``) and is ignored by the others.
"""
from __future__ import annotations

import inspect
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import qualiteacher
from qualiteacher.checkpoints import CheckpointError, check_keys, checkpoint_state, read_checkpoint
from qualiteacher.training.restore import check_weights_finite, inference_ready, restore
from qualiteacher.training.students import FORMAT, build_student, release, student_spec

log = logging.getLogger(__name__)

SPEC_FILE = "student.json"
WEIGHTS_FILE = "weights.pt"
DATA_DIR = "student"


def pinned_requirements() -> list[str]:
    """``torch`` and ``qualiteacher`` pinned to the versions installed here."""
    return [f"torch=={release(torch.__version__)}", f"qualiteacher=={qualiteacher.__version__}"]


def save_student(student: nn.Module, spec: dict[str, Any], folder: str | Path) -> Path:
    """Write ``student.json`` and ``weights.pt`` (tensors only) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    torch.save({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, folder / WEIGHTS_FILE)
    return folder


def load_student_folder(folder: str | Path) -> nn.Module:
    """The student saved by :func:`save_student`, on the CPU, in eval mode (strict, weights only;
    non-finite weights are refused)."""
    folder = Path(folder)
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"not a QualiTeacher student model: {spec_path} is missing")
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as err:
        raise ValueError(f"{spec_path} is not valid JSON: {err}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("build"), dict):
        raise ValueError(f"{spec_path}: not a {FORMAT} description")

    saved = spec.get("versions", {}).get("qualiteacher")
    if saved and saved != qualiteacher.__version__:
        log.warning("student saved with qualiteacher %s, loading with %s", saved, qualiteacher.__version__)
    build = dict(spec["build"])
    accepted = set(inspect.signature(build_student).parameters)
    unknown = sorted(set(build) - accepted - {"student"})
    if unknown:
        raise ValueError(f"{spec_path}: build settings {unknown} are unknown to this qualiteacher version")
    kind = build.pop("student")
    student = build_student(kind, **build)
    weights = folder / WEIGHTS_FILE
    state = checkpoint_state(read_checkpoint(weights), weights)
    check_keys(weights, state, student.state_dict(), "student")
    check_weights_finite(weights, state)
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(weights, f"weights do not fit the student: {str(err).splitlines()[-1].strip()}") from None
    return inference_ready(student)


def model_signature() -> Any:
    """Inputs ``image`` (B,3,H,W) float32, ``level`` (B,) int64, ``w`` (B,) float32; output the
    restored images (B,3,H,W) float32."""
    # lazy: mlflow takes 1.5 s to import; the app loads checkpoints through this module without it
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec  # lazy: mlflow, see model_signature's first import

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "level"),
                     TensorSpec(np.dtype(np.float32), (-1,), "w")])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]))


def log_student(student: nn.Module, hparams: dict[str, Any], name: str = "student",
                registered_model_name: str | None = None) -> Any:
    """Log ``student`` to the active MLflow run (no pickle; see the module docstring) and
    register it under ``registered_model_name``; returns MLflow's ``ModelInfo``."""
    import mlflow  # lazy: mlflow, see model_signature

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_student(student, student_spec(hparams), Path(tmp) / DATA_DIR)
        example = {"image": np.full((1, 3, 16, 16), 0.5, np.float32), "level": np.array([7], np.int64),
                   "w": np.array([1.0], np.float32)}
        return mlflow.pyfunc.log_model(name=name, loader_module=__name__, data_path=str(folder),
                                       pip_requirements=pinned_requirements(), signature=model_signature(),
                                       input_example=example, registered_model_name=registered_model_name)


def model_data_folder(local_model: str | Path) -> Path:
    """The student folder of a downloaded MLflow model folder (checks it is one of ours)."""
    from mlflow.models import Model  # lazy: mlflow, see model_signature

    local_model = Path(local_model)
    if not (local_model / "MLmodel").is_file():
        raise FileNotFoundError(f"not an MLflow model folder (no MLmodel file): {local_model}")
    flavor = Model.load(str(local_model / "MLmodel")).flavors.get("python_function", {})
    if flavor.get("loader_module") != __name__:
        raise ValueError(f"{local_model} is not a QualiTeacher student model (loader "
                         f"{flavor.get('loader_module')!r}); log students with qualiteacher.registry.log_student")
    data = str(flavor.get("data", f"data/{DATA_DIR}"))
    folder = (local_model / data).resolve()
    # the weights must lie inside the model folder: an absolute or ../ path is never followed
    if Path(data).is_absolute() or not folder.is_relative_to(local_model.resolve()):
        raise ValueError(f"{local_model / 'MLmodel'}: its data path {data!r} points outside the model folder; "
                         f"refused (a model's files live inside its folder)")
    return folder


def load_registered(model_uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> nn.Module:
    """The student of a logged or registered model (``models:/NAME/VERSION``, ``runs:/ID/student``),
    ready to call as ``student(x, level, w=None)``; on the CPU, in eval mode."""
    import mlflow  # lazy: mlflow, see model_signature

    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst or tmp))
        return load_student_folder(model_data_folder(local))


def restore_images(student: nn.Module, image: Tensor, level: Tensor, w: Tensor | None = None) -> Tensor:
    """``student`` at a per-image ``level`` (B,) on ``image`` (B,3,H,W) in [0,1]; ``w`` (B,) only
    for students with a fidelity path. As ``qualiteacher restore`` runs it: in tiles under the
    machine's memory budget (``qualiteacher.training.restore.restore``)."""
    use_w = w is not None and bool(getattr(student, "has_fidelity", False))
    return restore(student, image, level=level, w=w if use_w else None)


class StudentPyfunc:
    """The pyfunc face of a logged student: ``predict({"image", "level", "w"})`` -> images."""

    def __init__(self, student: nn.Module) -> None:
        self.student = student

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        if not isinstance(model_input, dict) or not {"image", "level"} <= set(model_input):
            raise ValueError("predict takes {'image': (B,3,H,W) float32, 'level': (B,) int64, 'w': (B,) float32}")
        image = torch.as_tensor(np.asarray(model_input["image"], dtype=np.float32))
        level = torch.as_tensor(np.asarray(model_input["level"], dtype=np.int64)).reshape(-1)
        w = model_input.get("w")
        w_t = None if w is None else torch.as_tensor(np.asarray(w, dtype=np.float32)).reshape(-1)
        return restore_images(self.student, image, level, w_t).numpy()


def _load_pyfunc(data_path: str) -> StudentPyfunc:
    """MLflow's loader-module entry point (``mlflow.pyfunc.load_model``)."""
    return StudentPyfunc(load_student_folder(data_path))
