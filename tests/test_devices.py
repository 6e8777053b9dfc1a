"""One device chooser: ``auto`` and ``gpu`` mean the same device in restore, training and the study."""
import torch

from qualiteacher.devices import best_device_type, gpu_type
from qualiteacher.pipeline.stages.evaluate import training_device
from qualiteacher.training.restore import resolve_device


def test_auto_is_the_gpu_when_there_is_one_and_the_cpu_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert gpu_type() is None and best_device_type() == "cpu"
    assert resolve_device("auto").type == "cpu" and training_device({}).type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert gpu_type() == "mps" and resolve_device("auto").type == "mps"
    assert training_device({"accelerator": "gpu"}).type == "mps" == training_device({"accelerator": "auto"}).type
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_type() == "cuda" and best_device_type() == "cuda" and resolve_device("auto").type == "cuda"
