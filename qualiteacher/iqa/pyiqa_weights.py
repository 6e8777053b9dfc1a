"""The weight files of pyiqa's no-reference metrics and where they are looked for (no pyiqa import).

``METRIC_WEIGHT_FILES`` lists, per pyiqa NR metric, every file pyiqa 0.1.16 loads when the metric is
built with its default configuration (its own checkpoint and any backbone), with the place pyiqa (or
torchvision / timm) looks for it. ``metric_available`` says whether they are all there without
building anything; nothing here downloads or touches the network: ``pyiqa_adapter`` fetches what is
missing and builds the metric (it is the only module that imports pyiqa).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

WeightStore = Literal["pyiqa", "clip", "torch", "hf"]


@dataclass(frozen=True)
class WeightFile:
    """One file a pyiqa metric loads when built with its default configuration.

    ``store`` is where it is cached: ``pyiqa`` (``$TORCH_HOME/hub/pyiqa``, pyiqa's weight repository),
    ``clip`` (``$TORCH_HOME/hub/clip``: OpenAI CLIP checkpoints as pyiqa's own CLIP loader caches them,
    not the ``clip`` package's ``~/.cache/clip``), ``torch`` (``$TORCH_HOME/hub/checkpoints``,
    torchvision) or ``hf`` (the Hugging Face hub cache; timm backbones). ``source`` is where it is
    downloaded from: a URL (clip, torch) or a repo id (hf); pyiqa files come from pyiqa's repository.
    ``kwarg`` is the ``create_metric`` keyword that receives the local path (None: the loader finds
    the file at its cache place itself). ``checkpoint`` marks the metric's own trained weights, which
    ``pretrained=False`` leaves out (backbones are still loaded).
    """

    store: WeightStore
    name: str
    source: str = ""
    kwarg: str | None = None
    checkpoint: bool = True


def _ckpt(name: str, kwarg: str | None = "pretrained_model_path") -> WeightFile:
    return WeightFile("pyiqa", name, kwarg=kwarg)


def _timm(repo: str) -> WeightFile:
    return WeightFile("hf", "model.safetensors", repo, checkpoint=False)


# metric -> every file pyiqa 0.1.16 loads for ``create_metric(metric)`` (DEFAULT_CONFIGS + arch code)
METRIC_WEIGHT_FILES: dict[str, tuple[WeightFile, ...]] = {
    "piqe": (),
    "entropy": (),
    "brisque": (_ckpt("brisque_svm_weights.pth"),),
    "niqe": (_ckpt("niqe_modelparameters.mat"),),
    "cnniqa": (_ckpt("CNNIQA_koniq10k-e6f14c91.pth"),),
    "musiq": (_ckpt("musiq_koniq_ckpt-e95806b9.pth"),),
    # CLIPIQA (model_type 'clipiqa', backbone RN50) has no checkpoint of its own: only CLIP's weights
    "clipiqa": (
        WeightFile(
            "clip",
            "RN50.pt",
            "https://openaipublic.azureedge.net/clip/models/"
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
            kwarg="backbone",
        ),
    ),
    "nima": (_timm("timm/inception_resnet_v2.tf_in1k"), _ckpt("NIMA_InceptionV2_ava-b0c77c00.pth")),
    "topiq_nr": (_timm("timm/resnet50.a1_in1k"), _ckpt("cfanet_nr_koniq_res50-9a73138b.pth")),
    "hyperiqa": (_timm("timm/resnet50.a1_in1k"), _ckpt("HyperIQA-resnet50-koniq10k-c96c41b1.pth")),
    # MANIQA reads a local path with weight key 'params' but its default file without: let pyiqa find it
    "maniqa": (
        _timm("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"),
        _ckpt("ckpt_koniq10k.pt", kwarg=None),
    ),
    "dbcnn": (
        WeightFile("torch", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
                   checkpoint=False),
        WeightFile("pyiqa", "DBCNN_scnn-7ea73d75.pth", checkpoint=False),
        _ckpt("DBCNN_KonIQ10k-2de81c0a.pth"),
    ),
}
# Python packages a metric imports beyond pyiqa's hard requirements
_METRIC_PACKAGES: dict[str, str] = {"clipiqa": "clip"}
_HUB_SUBDIRS: dict[str, str] = {"pyiqa": "pyiqa", "clip": "clip", "torch": "checkpoints"}
NO_WEIGHTS_METRICS = tuple(m for m, files in METRIC_WEIGHT_FILES.items() if not files)


def list_weight_table_metrics() -> list[str]:
    """Metrics whose weight files ``METRIC_WEIGHT_FILES`` lists."""
    return list(METRIC_WEIGHT_FILES)


def pyiqa_weights_dir() -> Path:
    """``$TORCH_HOME/hub/pyiqa`` (read at call time)."""
    return Path(torch.hub.get_dir()) / "pyiqa"


def _weight_files(metric: str) -> tuple[WeightFile, ...]:
    if metric not in METRIC_WEIGHT_FILES:
        raise KeyError(f"no weight-file entry for {metric!r}; listed: {list_weight_table_metrics()}")
    return METRIC_WEIGHT_FILES[metric]


def primary_weight_file(metric: str) -> WeightFile | None:
    """The file ``weights_path`` replaces: the one passed to pyiqa by keyword."""
    return next((f for f in METRIC_WEIGHT_FILES.get(metric, ()) if f.kwarg is not None), None)


def weight_file_path(file: WeightFile) -> Path:
    """Where ``file`` is expected: the file itself, or for a missing ``hf`` file its repo's cache folder."""
    if file.store != "hf":
        return Path(torch.hub.get_dir()) / _HUB_SUBDIRS[file.store] / file.name
    # lazy: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once, when first imported: not at our import
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(file.source, file.name)
    if isinstance(cached, str):
        return Path(cached)
    return Path(constants.HF_HUB_CACHE) / ("models--" + file.source.replace("/", "--"))


def metric_weight_files(metric: str) -> list[Path]:
    """Expected local paths of every file ``metric`` loads by default (see ``weight_file_path``)."""
    return [weight_file_path(f) for f in _weight_files(metric)]


def _where(file: WeightFile, path: Path) -> str:
    if file.store == "hf":
        return (f"'{file.name}' of the Hugging Face repo '{file.source}' (cache: {path}; fetch it with "
                f"`hf download {file.source} {file.name}`)")
    return f"'{file.name}' in {path.parent}"


def metric_available(metric: str) -> tuple[bool, str]:
    """``(True, "")`` when every file ``metric`` loads is present (or it needs none), else
    ``(False, reason)`` naming the missing file(s) and the folder to put them in. Never downloads."""
    if metric not in METRIC_WEIGHT_FILES:
        return False, f"the weight files of {metric!r} are not listed (METRIC_WEIGHT_FILES)"
    package = _METRIC_PACKAGES.get(metric)
    if package is not None and importlib.util.find_spec(package) is None:
        return False, f"{metric} needs the Python package {package!r}"
    missing = [_where(f, p) for f, p in zip(METRIC_WEIGHT_FILES[metric], metric_weight_files(metric))
               if not p.is_file()]
    if missing:
        return False, f"{metric} needs " + "; ".join(missing)
    return True, ""


def default_weight_file(metric: str) -> str | None:
    """File name of the file ``weights_path`` replaces for ``metric`` (None when it has none)."""
    file = primary_weight_file(metric)
    return None if file is None else file.name
