"""Detectors for the detection benchmarks, and COCO -> data-set class maps.

A detector is any callable ``detector(images) -> outputs``: ``images`` a list of ``(3, H, W)``
float tensors in [0, 1] (sizes may differ), ``outputs`` one dict per image with ``boxes``
``(N, 4)`` x1 y1 x2 y2 in pixels, ``scores`` ``(N,)`` and ``labels`` ``(N,)``: integer COCO ids
(as torchvision detectors give them, see `coco_category_names`) or class names. A torchvision
detection model in eval mode is one.

`build_detector` builds a torchvision model from a local weight file (nothing is downloaded) or
imports a user's callable; `run_detector` runs it and turns its labels into data-set class names
through a class map (`load_class_map`, defaults in `DEFAULT_CLASS_MAPS`).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from torch import nn

from qualiteacher.data.layouts.exdark import EXDARK_CLASSES
from qualiteacher.data.layouts.rtts import RTTS_CLASSES
from qualiteacher.data.records import format_names
from qualiteacher.eval.detection import Detections

Detector = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]

DATASET_CLASSES: dict[str, tuple[str, ...]] = {"rtts": RTTS_CLASSES, "exdark": EXDARK_CLASSES}

DEFAULT_CLASS_MAPS: dict[str, dict[str, str]] = {
    "rtts": {"person": "person", "bicycle": "bicycle", "car": "car", "motorcycle": "motorbike", "bus": "bus"},
    "exdark": {
        "bicycle": "Bicycle", "boat": "Boat", "bottle": "Bottle", "bus": "Bus", "car": "Car", "cat": "Cat",
        "chair": "Chair", "cup": "Cup", "dog": "Dog", "motorcycle": "Motorbike", "person": "People",
        "dining table": "Table",
    },
}

_PLACEHOLDERS = ("__background__", "N/A")  # entries of the COCO list that are no class


class MissingDetectorWeightsError(FileNotFoundError):
    """The weight file of a torchvision detector is not given or does not exist."""

    def __init__(self, name: str, path: str | Path | None) -> None:
        self.name, self.path = name, None if path is None else Path(path)
        what = "no weight file given" if path is None else f"weight file {self.path} not found"
        hint = ""
        try:
            default = torchvision.models.get_model_weights(name).DEFAULT
            hint = f" torchvision's {type(default).__name__}.{default.name} are at {default.url};"
        except (ValueError, AttributeError):
            pass
        super().__init__(f"detector {name!r}: {what}. QualiTeacher downloads nothing.{hint} save the "
                         "state dict locally and pass its path as the detector weights.")

    def __reduce__(self):
        return (type(self), (self.name, self.path))


@functools.cache
def _coco_names() -> tuple[str, ...]:
    weights = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT
    return tuple(weights.meta["categories"])


def coco_category_names() -> list[str]:
    """torchvision's COCO categories; index = label id of torchvision detectors (0 background,
    ``"N/A"`` for unused ids)."""
    return list(_coco_names())


def list_detectors() -> list[str]:
    """Names of the torchvision detection models `build_detector` accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def _dataset_classes(dataset: str) -> tuple[str, ...]:
    key = dataset.lower()
    if key not in DATASET_CLASSES:
        raise ValueError(f"unknown detection data set {dataset!r}; known: {', '.join(DATASET_CLASSES)}")
    return DATASET_CLASSES[key]


def _parse_spec(spec: str | os.PathLike) -> Mapping:
    text = str(spec)
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"class map file {path} not found")
        try:
            raw = path.read_text()
            data = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
        except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read class map {path}: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ValueError(f"class map {path} must hold a mapping 'coco name: data-set name', "
                             f"got {type(data).__name__}")
        return data
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    if not pairs or any(p.count("=") != 1 for p in pairs):
        raise ValueError(f"class map {text!r}: expected a YAML/JSON file or 'coco_name=data_set_name,...'")
    return {k.strip(): v.strip() for k, v in (p.split("=") for p in pairs)}


def load_class_map(spec: Mapping | str | os.PathLike | None, dataset: str | None = None,
                   source_names: Sequence[str] | None = None) -> dict[str, str]:
    """Map from detector class names to data-set class names.

    ``spec``: None (the default map of ``dataset``, see `DEFAULT_CLASS_MAPS`), a mapping, a YAML
    or JSON file holding one, or a string ``"motorcycle=motorbike,person=person"``. Keys are names
    of ``source_names`` (default `coco_category_names`) or integer ids into it. With ``dataset``
    the values must be classes of that data set.

    Raises:
        ValueError: unknown data set, unknown key (close matches are listed) or unknown value.
        FileNotFoundError: ``spec`` names a file that does not exist.
    """
    if spec is None:
        if dataset is None:
            raise ValueError("load_class_map: give a class map or a data set "
                             f"with a default one ({', '.join(DEFAULT_CLASS_MAPS)})")
        if dataset.lower() not in DEFAULT_CLASS_MAPS:
            raise ValueError(f"no default class map for data set {dataset!r}; known: "
                             f"{', '.join(DEFAULT_CLASS_MAPS)}; pass a class map")
        raw: Mapping = DEFAULT_CLASS_MAPS[dataset.lower()]
    else:
        raw = spec if isinstance(spec, Mapping) else _parse_spec(spec)
    names = list(_coco_names() if source_names is None else source_names)
    valid = [n for n in names if n not in _PLACEHOLDERS]
    out: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            i = int(key)
            if not 0 <= i < len(names) or names[i] in _PLACEHOLDERS:
                raise ValueError(f"class map: id {key} is no detector class (ids 1..{len(names) - 1})")
            key = names[i]
        key = str(key)
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; known: {format_names(valid)}"
            raise ValueError(f"class map: {key!r} is not a detector class name{hint}")
        out[key] = str(value)
    if not out:
        raise ValueError("class map is empty: no detection would be kept")
    if dataset is not None:
        allowed = _dataset_classes(dataset)
        wrong = sorted({v for v in out.values() if v not in allowed})
        if wrong:
            raise ValueError(f"class map: {', '.join(map(repr, wrong))} not classes of {dataset} "
                             f"({', '.join(allowed)})")
    return out


def _load_state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise ValueError(f"detector {name!r}: cannot load weights {path} as a state dict ({exc}); "
                         "save model.state_dict(), not the model object") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"detector {name!r}: {path} holds no state dict (a dict of tensors, or one "
                         "under 'state_dict' or 'model')")
    return dict(obj)


def _import_target(target: str) -> object:
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"detector target {target!r}: expected 'package.module:name' or 'path/to/file.py:name'")
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(where).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"detector target {target!r}: file {path} not found")
        module_name = f"_qualiteacher_detector_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"detector target {target!r}: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(module_name, None)
            raise
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ImportError(f"detector target {target!r}: cannot import module {where!r}: {exc}") from exc
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise ValueError(f"detector target {target!r}: no {attr!r} in {where}; it has {format_names(public)}")
        obj = getattr(obj, part)
    if inspect.isclass(obj) or not callable(obj):
        raise TypeError(f"detector target {target!r} is {'a class' if inspect.isclass(obj) else type(obj).__name__}"
                        "; it must be the detector itself, a callable(list of images) -> list of dicts "
                        "(e.g. a model instance)")
    return obj


def build_detector(name: str | None = None, weights: str | Path | None = None, target: str | None = None,
                   device: str | torch.device = "cpu") -> Detector:
    """A frozen detector in eval mode on ``device``.

    Either ``name``, a torchvision detection model (`list_detectors`), with ``weights``, a local
    file holding its state dict (or a dict with it under ``"state_dict"`` or ``"model"``), loaded
    strictly; or ``target``, ``"package.module:attr"`` or ``"path/to/file.py:attr"``, whose
    ``attr`` is the detector callable itself (an ``nn.Module`` is also frozen and moved).

    Raises:
        MissingDetectorWeightsError: ``weights`` not given or not found (nothing is downloaded).
        ValueError: unknown model name, both or none of ``name``/``target``, a weight file that does
            not fit the model, or a target without the named attribute.
        TypeError: ``target`` names a class or a non-callable.
    """
    if (name is None) == (target is None):
        raise ValueError("build_detector: give either a torchvision model name (with weights) or a target")
    if target is not None:
        if weights is not None:
            raise ValueError("build_detector: weights go with a torchvision model name; a target loads its own")
        detector = _import_target(target)
    else:
        known = list_detectors()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown torchvision detection model {name!r}{hint}; known: {', '.join(known)}")
        if weights is None or not Path(weights).is_file():
            raise MissingDetectorWeightsError(name, weights)
        detector = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        state = _load_state_dict(name, Path(weights))
        try:
            detector.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"detector {name!r}: weights {weights} do not fit the model (a different "
                             f"architecture or number of classes?): {exc}") from exc
    if isinstance(detector, nn.Module):
        detector = detector.eval().requires_grad_(False).to(device)
    return detector  # type: ignore[return-value]


def _label_names(labels: torch.Tensor | Sequence, class_map: Mapping[str, str], mapped: set[str]) -> list[str | None]:
    """Data-set name of each label, None for a label outside the map."""
    coco = _coco_names()
    out: list[str | None] = []
    for v in labels.tolist() if isinstance(labels, torch.Tensor) else list(labels):
        if isinstance(v, str):
            out.append(class_map.get(v, v if v in mapped else None))
            continue
        if not 0 <= int(v) < len(coco):
            raise ValueError(f"detector label id {int(v)} is outside the COCO ids 0..{len(coco) - 1}; "
                             "give a detector with COCO labels, or one returning class names")
        out.append(class_map.get(coco[int(v)]))
    return out


def _detections(image_id: str, result: Mapping, class_map: Mapping[str, str], mapped: set[str]) -> Detections:
    """One detector output as `Detections` of the mapped classes."""
    missing = [k for k in ("boxes", "scores", "labels") if k not in result]
    if missing:
        raise ValueError(f"detector output for {image_id!r} lacks {missing}")
    boxes = torch.as_tensor(result["boxes"]).detach().cpu().float().reshape(-1, 4)
    scores = torch.as_tensor(result["scores"]).detach().cpu().double().reshape(-1)
    labels = result["labels"]
    names = _label_names(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, class_map, mapped)
    if not (len(boxes) == len(scores) == len(names)):
        raise ValueError(f"detector output for {image_id!r}: {len(boxes)} boxes, {len(scores)} scores, "
                         f"{len(names)} labels")
    keep = np.array([n is not None for n in names], dtype=bool)
    return Detections(boxes.numpy()[keep], scores.numpy()[keep], [n for n in names if n is not None])


def run_detector(detector: Detector, items: Iterable[tuple[str, torch.Tensor]], class_map: Mapping[str, str],
                 batch_size: int = 4, device: str | torch.device = "cpu") -> dict[str, Detections]:
    """Detections per image id, labels as data-set class names.

    ``items`` yields ``(image_id, image)`` with ``image`` ``(3, H, W)`` float in [0, 1] (uint8 is
    scaled); they go to the detector in lists of ``batch_size`` on ``device``, under no_grad.
    Integer labels are COCO ids, turned into names by `coco_category_names` then by ``class_map``;
    name labels are mapped when they are keys of ``class_map``, kept when they are already data-set
    names (values of it). Detections of any other class are dropped.

    Raises:
        ValueError: no image, a duplicate id, a malformed image or detector output.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mapped = set(class_map.values())
    out: dict[str, Detections] = {}
    iterator = iter(items)
    with torch.no_grad():
        while batch := list(itertools.islice(iterator, batch_size)):
            images = []
            for image_id, image in batch:
                if image_id in out or any(image_id == other for other, _ in images):
                    raise ValueError(f"run_detector: image id {image_id!r} occurs twice")
                if image.ndim != 3 or image.shape[0] != 3:
                    raise ValueError(f"run_detector: image {image_id!r} must be (3, H, W), got {tuple(image.shape)}")
                image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
                images.append((image_id, image.to(device)))
            outputs = detector([image for _, image in images])
            if not isinstance(outputs, Sequence) or len(outputs) != len(images):
                raise ValueError(f"detector returned {type(outputs).__name__} for {len(images)} image(s); "
                                 "expected a list with one dict per image")
            for (image_id, _), result in zip(images, outputs):
                out[image_id] = _detections(image_id, result, class_map, mapped)
    if not out:
        raise ValueError("run_detector: no image to run the detector on (empty split?)")
    return out
