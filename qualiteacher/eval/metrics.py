"""The NR-IQA metric set of the evaluation harness: which metrics, how they are built, how they score.

``EVAL_METRICS`` holds the metrics the literature reports (pyiqa backends) and the two offline
substitutes the offline ensemble uses (BRISQUE with the ``brisque`` package's LIVE SVR, NIQE fitted on
scikit-image photos). ``resolve_metrics`` builds a set of them: by default every metric of
``DEFAULT_METRICS`` whose weight files are available (or downloadable when downloads are allowed),
with the offline substitute of BRISQUE / NIQE when those are not, so a machine without internet gets
``OFFLINE_METRICS``. Scores are raw, on each metric's native scale; ``higher_better`` says which way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor, nn

from qualiteacher.iqa.ensemble import upsample_to_min_side
from qualiteacher.iqa.guards import MemberDomain, guarded_scores, member_domain
from qualiteacher.iqa.members import MissingWeightsError, downloads_allowed
from qualiteacher.iqa.presets import build_member, preset_specs
from qualiteacher.iqa.pyiqa_adapter import build_pyiqa_member, resolve_metric_kwargs
from qualiteacher.iqa.pyiqa_weights import metric_available


@dataclass(frozen=True)
class EvalMetric:
    """One NR-IQA metric of the evaluation: ``backend`` is ``pyiqa:<metric>`` or ``offline:<member>``
    (the offline preset's member of that name); ``label`` names it in tables."""

    name: str
    backend: str
    higher_better: bool
    label: str

    @property
    def kind(self) -> str:
        return self.backend.partition(":")[0]

    @property
    def metric(self) -> str:
        return self.backend.partition(":")[2]


EVAL_METRICS: dict[str, EvalMetric] = {
    "cnniqa": EvalMetric("cnniqa", "pyiqa:cnniqa", True, "CNNIQA"),
    "musiq": EvalMetric("musiq", "pyiqa:musiq", True, "MUSIQ"),
    "clipiqa": EvalMetric("clipiqa", "pyiqa:clipiqa", True, "CLIPIQA"),
    "nima": EvalMetric("nima", "pyiqa:nima", True, "NIMA"),
    "topiq_nr": EvalMetric("topiq_nr", "pyiqa:topiq_nr", True, "TOPIQ-NR"),
    "maniqa": EvalMetric("maniqa", "pyiqa:maniqa", True, "MANIQA"),
    "dbcnn": EvalMetric("dbcnn", "pyiqa:dbcnn", True, "DBCNN"),
    "hyperiqa": EvalMetric("hyperiqa", "pyiqa:hyperiqa", True, "HyperIQA"),
    "niqe": EvalMetric("niqe", "pyiqa:niqe", False, "NIQE"),
    "brisque": EvalMetric("brisque", "pyiqa:brisque", False, "BRISQUE"),
    "piqe": EvalMetric("piqe", "pyiqa:piqe", False, "PIQE"),
    "brisque_live": EvalMetric("brisque_live", "offline:brisque", False, "BRISQUE-LIVE"),
    "niqe_fit": EvalMetric("niqe_fit", "offline:niqe", False, "NIQE-fit"),
}
DEFAULT_METRICS: tuple[str, ...] = ("cnniqa", "musiq", "clipiqa", "niqe", "brisque", "piqe")
OFFLINE_METRICS: tuple[str, ...] = ("piqe", "brisque_live", "niqe_fit")
# auto mode: metric -> the offline metric that stands in for it when its weights are missing
OFFLINE_SUBSTITUTES: dict[str, str] = {"brisque": "brisque_live", "niqe": "niqe_fit"}


class MetricSet(NamedTuple):
    modules: dict[str, nn.Module]  # name -> frozen (B, 3, H, W) in [0, 1] -> (B,) raw score
    skipped: dict[str, str]  # name -> why it is not in ``modules``


def list_eval_metrics() -> list[str]:
    """Names of every NR-IQA metric the evaluation knows."""
    return list(EVAL_METRICS)


def metric_label(name: str) -> str:
    """Table header of a metric with its direction, e.g. ``"NIQE ↓"``, ``"MUSIQ ↑"``."""
    metric = _lookup(name)
    return f"{metric.label} {'↑' if metric.higher_better else '↓'}"


class MinSizeScorer(nn.Module):
    """A member module run as the ensemble runs it: float32, no autocast, images clamped to [0, 1]
    and upsampled (bilinear) so the shorter side is at least ``min_size``; images outside the
    metric's ``domain`` (tiny, extreme aspect, constant, NaN; see ``iqa.guards``) score NaN."""

    def __init__(self, module: nn.Module, min_size: int, domain: MemberDomain | None = None,
                 name: str = "metric") -> None:
        super().__init__()
        self.module = module
        self.min_size = int(min_size)
        self.domain = domain or member_domain("pyiqa", module)
        self.name = name

    def forward(self, images: Tensor) -> Tensor:
        def score(x: Tensor) -> Tensor:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.module(upsample_to_min_side(x.float().clamp(0, 1), self.min_size)).float().reshape(-1)

        # raw scores have no known worst value here: a constant image is unscorable (NaN)
        return guarded_scores(score, images, self.domain, None, self.name)


def _lookup(name: str) -> EvalMetric:
    if name not in EVAL_METRICS:
        raise ValueError(f"unknown NR-IQA metric {name!r}; available: {list_eval_metrics()}")
    return EVAL_METRICS[name]


def _offline_hint() -> str:
    return (f"Without internet evaluate with the offline metrics: --metrics {','.join(OFFLINE_METRICS)} "
            f"(or leave --metrics out to use whatever is available).")


def _availability(metric: EvalMetric) -> tuple[bool, str]:
    if metric.kind != "pyiqa":
        return True, ""

    return metric_available(metric.metric)


def _build(metric: EvalMetric, allow_download: bool) -> MinSizeScorer:
    if metric.kind == "pyiqa":
        module: nn.Module = build_pyiqa_member(metric.metric, metric.name, allow_download=allow_download,
                                               offline_hint=_offline_hint())
        min_size = module.min_size
    else:
        # the offline ensemble's own member spec, so the scores are the ensemble's raw scores
        spec = next(s for s in preset_specs("offline") if s.name == metric.metric)
        module = build_member(spec)
        min_size = spec.options.get("min_size", getattr(module, "min_size", 0))
    scorer = MinSizeScorer(module, min_size, member_domain(metric.kind, module), metric.name)
    scorer.requires_grad_(False)
    return scorer.eval()


def _try_build(name: str, allow_download: bool, modules: dict[str, nn.Module],
               skipped: dict[str, str]) -> None:
    try:
        modules[name] = _build(EVAL_METRICS[name], allow_download)
    except (MissingWeightsError, ImportError, OSError, RuntimeError) as err:  # failed download, bad file
        skipped[name] = f"{type(err).__name__}: {err}"


def _auto_names(allow_download: bool) -> tuple[list[str], dict[str, str]]:
    """DEFAULT_METRICS that can be built (present, or downloadable) and the skip reasons of the rest."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name in DEFAULT_METRICS:
        ok, reason = _availability(EVAL_METRICS[name])
        if ok or allow_download:
            chosen.append(name)
        else:
            skipped[name] = f"{reason} (downloads are disabled)"
    return chosen, skipped


def resolve_metrics(names: Sequence[str] | None = None, allow_download: bool | None = None) -> MetricSet:
    """Build the NR-IQA metrics of an evaluation.

    ``names=None`` is auto mode: every ``DEFAULT_METRICS`` member whose weight files are present, or
    can be downloaded when downloads are allowed (``allow_download``, default ``downloads_allowed()``;
    with downloads disabled nothing touches the network), plus ``OFFLINE_SUBSTITUTES`` of BRISQUE /
    NIQE when those are skipped; every skip is recorded with its reason. Explicit ``names``: an
    unknown name raises ``ValueError``, a metric whose weights are missing ``MissingWeightsError``
    (which file, where it goes, and the offline metrics to use instead).
    """
    allow = downloads_allowed() if allow_download is None else allow_download
    modules: dict[str, nn.Module] = {}
    if names is None:
        chosen, skipped = _auto_names(allow)
        for name in chosen:
            _try_build(name, allow, modules, skipped)
        for name, substitute in OFFLINE_SUBSTITUTES.items():
            if name in skipped and substitute not in modules:
                _try_build(substitute, allow, modules, skipped)
        return MetricSet(modules, skipped)
    if isinstance(names, str):  # "cnniqa,musiq" as typed on a command line
        names = [n.strip() for n in names.split(",") if n.strip()]
    metrics = [_lookup(n) for n in dict.fromkeys(names)]
    if not metrics:
        raise ValueError(f"resolve_metrics: no metric named; available: {list_eval_metrics()}")
    if not allow:  # check every file before building anything; nothing is downloaded
        for metric in metrics:
            if metric.kind == "pyiqa":
                resolve_metric_kwargs(metric.name, metric.metric, None, False, offline_hint=_offline_hint())
    for metric in metrics:
        modules[metric.name] = _build(metric, allow)
    return MetricSet(modules, {})


def score_images(metric_set: MetricSet, images: Tensor) -> pd.DataFrame:
    """Raw scores of ``images`` (B, 3, H, W) in [0, 1]: one row per image, one column per metric.

    Each metric scores the whole batch in one call, without gradients, on the device the images and
    modules are on (move the modules with ``module.to(device)``).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"score_images expects images (B, 3, H, W), got {tuple(images.shape)}")
    columns: dict[str, object] = {}
    with torch.no_grad():
        for name, module in metric_set.modules.items():
            scores = module(images)
            if scores.shape != (images.shape[0],):
                raise RuntimeError(f"metric {name!r}: scores {tuple(scores.shape)} for {len(images)} images")
            columns[name] = scores.double().cpu().numpy()
    return pd.DataFrame(columns, index=pd.RangeIndex(images.shape[0]))
