"""The registered student: no pickle, pinned requirements, loads back and restores exactly as the
checkpoint it came from (qualiteacher/registry.py)."""
import json

import mlflow
import numpy as np
import pytest
import torch

from qualiteacher.registry import load_registered, log_student, pinned_requirements
from qualiteacher.training.restore import inference_ready, restore


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    # an experiment of this store: the active experiment id MLflow keeps globally may name one of an
    # earlier test's store (the suite failed here with "No Experiment with id=1 exists")
    mlflow.set_experiment("registry-test")
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("student", ["unet", "iqpir"])
def test_registered_student_restores_like_the_checkpoint(tmp_path, store, student):
    from test_safety import write_stage3_checkpoint

    from qualiteacher.training.stage3 import load_trained

    module = load_trained(write_stage3_checkpoint(tmp_path / "s3.ckpt", student=student))
    with mlflow.start_run():
        info = log_student(module.student, dict(module.hparams), registered_model_name=f"qt-{student}")
    local = tmp_path / "download"
    loaded = load_registered(f"models:/qt-{student}/1", dst=local)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "data/student/weights.pt" in files and "data/student/student.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", "model.pth"))]  # nothing to unpickle
    assert set(pinned_requirements()) <= set((local / "requirements.txt").read_text().split())
    assert all("==" in r for r in pinned_requirements())
    spec = json.loads((local / "data" / "student" / "student.json").read_text())
    assert spec["build"]["student"] == student and spec["build"]["preset"] == "tiny"
    assert torch.load(local / "data" / "student" / "weights.pt", weights_only=True)  # tensors only

    x = torch.rand(2, 3, 40, 36)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in loaded.parameters() if p.ndim == 4)
    inference_ready(module.student)  # what `load_for_inference` gives: the same layout, the same bits
    for level in (0, 7):
        assert torch.equal(restore(loaded, x, level=level), restore(module.student, x, level=level))
    # the generic MLflow way: pyfunc with the signature's tensors image, level, w
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    w = np.array([1.0, 1.0], np.float32)
    out = pyfunc.predict({"image": x.numpy(), "level": np.array([7, 7]), "w": w})
    assert np.array_equal(out, restore(module.student, x, level=7).numpy())
    if getattr(loaded, "has_fidelity", False):  # w reaches students with a fidelity path, and only them
        w0 = pyfunc.predict({"image": x.numpy(), "level": np.array([7, 7]), "w": np.zeros(2, np.float32)})
        assert np.array_equal(w0, restore(module.student, x, level=7, w=0.0).numpy())
        assert not np.array_equal(w0, out)


def test_a_foreign_model_is_refused(tmp_path, store):
    from qualiteacher.registry import model_data_folder

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.pytorch\n")
    with pytest.raises(ValueError, match="not a QualiTeacher student model"):
        model_data_folder(tmp_path / "m")
