"""Typed IQA member metadata, score normalisation and quality levels (METHOD.md §2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from qualiteacher.downloads import downloads_allowed  # noqa: F401  (re-exported: iqa and eval import it here)

NUM_LEVELS = 8
TOP_LEVEL_SCORE = 0.7

RewardMode = Literal["grad", "detach", "exclude"]
BACKEND_KINDS = ("pyiqa", "offline", "physical", "clip")


class MissingWeightsError(FileNotFoundError):
    """A member needs a weight file that is neither cached nor downloadable."""

    def __init__(self, member: str, file_name: str, expected_path: str, hint: str) -> None:
        self.member = member
        self.file_name = file_name
        self.expected_path = expected_path
        message = (
            f"IQA member '{member}' needs the weight file '{file_name}', which is not available.\n"
            f"  Put the file at: {expected_path}\n"
            f"  (or give its path as `weights_path` of the member in the preset YAML).\n"
            f"  {hint}"
        )
        super().__init__(message)


@dataclass(frozen=True)
class Normalization:
    """How a raw score maps to [0, 1], higher = better.

    ``kind="range"``: ``(raw - lo) / (hi - lo)`` clamped to [0, 1], then ``1 - x`` for lower-better
    metrics. ``kind="minmax"``: the same formula with ``lo``/``hi`` taken per call from the scored
    batch (per-dataset min-max: score the whole data set in one call, or fit ``lo``/``hi`` on it and
    use ``range``).
    """

    kind: Literal["range", "minmax"] = "range"
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("range", "minmax"):
            raise ValueError(f"Normalization.kind must be 'range' or 'minmax', got {self.kind!r}")
        if self.kind == "range" and not self.hi > self.lo:
            raise ValueError(f"Normalization range needs hi > lo, got lo={self.lo}, hi={self.hi}")


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member.

    ``backend`` is ``"<kind>:<name>"`` with kind in pyiqa (a pyiqa metric name), offline (our
    offline-weight metrics: brisque, niqe), physical (physical.py) or clip (clip_member.py).
    ``options`` are member-specific keyword arguments (e.g. ``min_size``, ``task``, ``model``).
    """

    name: str
    backend: str
    weight: float
    normalization: Normalization
    higher_better: bool
    differentiable: bool
    reward_mode: RewardMode = "grad"
    weights_path: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind, _, metric = self.backend.partition(":")
        if kind not in BACKEND_KINDS or not metric:
            raise ValueError(
                f"member {self.name!r}: backend must be '<kind>:<name>' with kind in "
                f"{BACKEND_KINDS}, got {self.backend!r}"
            )
        if not self.weight >= 0:
            raise ValueError(f"member {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.reward_mode not in ("grad", "detach", "exclude"):
            raise ValueError(f"member {self.name!r}: bad reward_mode {self.reward_mode!r}")
        if self.reward_mode == "grad" and not self.differentiable:
            raise ValueError(
                f"member {self.name!r} is not differentiable: use reward_mode 'detach' or 'exclude'"
            )

    @property
    def kind(self) -> str:
        return self.backend.partition(":")[0]

    @property
    def metric(self) -> str:
        return self.backend.partition(":")[2]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["options"] = dict(self.options)
        if out["weights_path"] is None:
            del out["weights_path"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemberSpec":
        data = dict(data)
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"member {data.get('name')!r}: unknown keys {sorted(unknown)}")
        norm = data.get("normalization", {})
        data["normalization"] = norm if isinstance(norm, Normalization) else Normalization(**norm)
        data["options"] = dict(data.get("options") or {})
        return cls(**data)


def normalize_score(raw: Tensor, norm: Normalization, higher_better: bool) -> Tensor:
    """Map raw scores (B,) to [0, 1], higher = better (differentiable inside the range)."""
    if norm.kind == "range":
        lo, hi = norm.lo, norm.hi
        x = (raw - lo) / (hi - lo)
    else:
        lo_t, hi_t = raw.min().detach(), raw.max().detach()
        x = (raw - lo_t) / (hi_t - lo_t).clamp_min(1e-12)
    x = x.clamp(0.0, 1.0)
    return x if higher_better else 1.0 - x


def fuse_scores(normalized: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Weighted mean of normalised member scores, weights renormalised to sum 1."""
    total = sum(weights[name] for name in normalized)
    if total <= 0:
        raise ValueError(f"fuse_scores: weights of {list(normalized)} sum to {total}, need > 0")
    return sum(normalized[name] * (weights[name] / total) for name in normalized)


def default_level(fused: Tensor) -> Tensor:
    """``q = 7 if s >= 0.7 else clamp(floor(10 s), 0, 7)`` as a (B,) long tensor."""
    top = NUM_LEVELS - 1
    q = torch.floor(fused.detach() * 10).clamp(0, top).long()
    return torch.where(fused.detach() >= TOP_LEVEL_SCORE, torch.full_like(q, top), q)


def fit_quantile_levels(scores: Tensor, num_levels: int = NUM_LEVELS) -> Tensor:
    """Thresholds (num_levels - 1,) that spread a pool of fused scores evenly over the levels."""
    scores = scores.detach().flatten().float()
    if scores.numel() < num_levels:
        raise ValueError(f"fit_quantile_levels: need >= {num_levels} scores, got {scores.numel()}")
    qs = torch.arange(1, num_levels, dtype=torch.float32, device=scores.device) / num_levels
    return torch.quantile(scores, qs)


def quantile_level(fused: Tensor, thresholds: Tensor) -> Tensor:
    """Level = number of thresholds at or below the score, (B,) long in 0..len(thresholds)."""
    return torch.bucketize(fused.detach(), thresholds.to(fused.device, fused.dtype), right=True)


def total_weight_is_positive(specs: list[MemberSpec]) -> None:
    if not specs:
        raise ValueError("an ensemble needs at least one member")
    if not math.fsum(s.weight for s in specs) > 0:
        raise ValueError(f"member weights {[s.weight for s in specs]} sum to 0")
