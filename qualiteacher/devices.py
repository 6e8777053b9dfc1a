"""Which accelerator this process can use: the one place the package decides it.

``auto`` everywhere (``restore --device auto``, a stage's ``trainer.accelerator`` unset or ``auto``,
the study's measurements) means :func:`best_device_type`; Lightning's ``gpu`` means :func:`gpu_type`.
"""
from __future__ import annotations

import torch


def gpu_type() -> str | None:
    """``cuda`` when torch sees a CUDA GPU, else ``mps`` on Apple's GPU, else None."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else None


def best_device_type() -> str:
    """The device ``auto`` picks: a GPU (:func:`gpu_type`) when there is one, else ``cpu``."""
    return gpu_type() or "cpu"
