"""Guards around IQA members: each member scores only the images inside its own domain.

A member's domain (:class:`MemberDomain`) says what it can judge: a shorter side of at least
``min_side`` px, an aspect ratio of at most ``max_aspect`` (a 20000 x 8 strip upsampled to NIQE's
192-px minimum would ask for tens of GB), finite pixels, and what a constant image gets
(``worst``: the worst score of the member's normalisation, since natural-scene statistics are
undefined on a flat image and a collapsed output is the worst outcome there is; ``score``: the
member handles it; ``unscorable``). A member that still raises or returns a non-finite score on a
batch is retried one image at a time, so one bad image never takes the others down with it.
An image a member cannot judge gets a NaN raw score ("unscorable"); the ensemble fuses the members
that did score it (:func:`fuse_available`) and marks the image unscorable (fused NaN) when those
hold less than ``MIN_SCORED_WEIGHT`` of the total weight.

Domains come from the member module's ``iqa_domain`` attribute when it has one, else from its
backend kind (:data:`DEFAULT_DOMAINS`): the guard is generic, never a per-name rule.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from qualiteacher.iqa.members import fuse_scores

log = logging.getLogger(__name__)

ConstantRule = Literal["worst", "score", "unscorable"]
CONSTANT_RANGE = 1.0 / 255.0   # max - min below this (over pixels and channels): a constant image
MIN_SCORED_WEIGHT = 0.5        # fused score only when the scoring members hold at least this weight share
# what a member may raise on an image outside its domain (LinAlgError is a RuntimeError in torch)
MEMBER_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, ZeroDivisionError,
                                                  FloatingPointError, MemoryError, np.linalg.LinAlgError)


@dataclass(frozen=True)
class MemberDomain:
    """The images a member can judge (see the module docstring)."""

    min_side: int = 8
    max_aspect: float = 8.0
    constant: ConstantRule = "worst"


# statistics-based and learned members (pyiqa, offline NIQE / BRISQUE) need texture and sane shapes;
# CLIP resizes to its own input and judges a flat image fine; the physical members are local
# image measurements, defined on any image of at least 2 x 2 px
DEFAULT_DOMAINS: dict[str, MemberDomain] = {
    "pyiqa": MemberDomain(min_side=8, max_aspect=8.0, constant="worst"),
    "offline": MemberDomain(min_side=8, max_aspect=8.0, constant="worst"),
    "clip": MemberDomain(min_side=8, max_aspect=8.0, constant="score"),
    "physical": MemberDomain(min_side=2, max_aspect=math.inf, constant="score"),
}

_warned: set[tuple[str, str]] = set()


def member_domain(kind: str, module: nn.Module | None = None) -> MemberDomain:
    """The domain of a member: its module's ``iqa_domain`` if declared, else its kind's default."""
    own = getattr(module, "iqa_domain", None)
    if isinstance(own, MemberDomain):
        return own
    return DEFAULT_DOMAINS.get(kind, MemberDomain())


def worst_raw_score(lo: float, hi: float, higher_better: bool) -> float:
    """The raw score that normalises to 0 under a ``range`` normalisation ``[lo, hi]``."""
    return float(lo if higher_better else hi)


def shape_violation(height: int, width: int, domain: MemberDomain) -> str | None:
    """Why an image of ``height`` x ``width`` is outside ``domain`` (None when it is inside)."""
    short, long = min(height, width), max(height, width)
    if short < domain.min_side:
        return f"shorter side {short} px < {domain.min_side} px"
    if long / short > domain.max_aspect:
        return f"aspect ratio {long / short:.0f}:1 > {domain.max_aspect:g}:1"
    return None


def _note(name: str, reason: str, count: int) -> None:
    kind = reason.split(" ", 1)[0]
    level = logging.WARNING if (name, kind) not in _warned else logging.DEBUG
    _warned.add((name, kind))
    log.log(level, "IQA member %s: %d image(s) unscorable (%s)", name, count, reason)


def guarded_scores(score: Callable[[Tensor], Tensor], images: Tensor, domain: MemberDomain,
                   worst: float | None = None, name: str = "member") -> Tensor:
    """Raw scores (B,) of ``images`` (B, 3, H, W) by ``score``, with NaN for the images outside
    ``domain`` or on which the member fails; constant images get ``worst`` under the ``worst``
    rule (NaN when ``worst`` is None). Gradients flow through the scores that were computed.
    """
    b, _, h, w = images.shape
    nan = torch.full((b,), math.nan, device=images.device, dtype=torch.float32)
    why = shape_violation(h, w, domain)
    if why is not None:
        _note(name, why, b)
        return nan
    with torch.no_grad():
        flat = images.detach().flatten(1)
        finite = torch.isfinite(flat).all(1)                                      # (B,)
        spread = flat.amax(1) - flat.amin(1) if flat.shape[1] else torch.zeros(b, device=images.device)
        constant = finite & (spread < CONSTANT_RANGE)
    fill = nan
    if domain.constant == "score":
        run = finite
    else:
        run = finite & ~constant
        if domain.constant == "worst" and worst is not None and bool(constant.any()):
            fill = torch.where(constant, torch.full_like(nan, worst), nan)
    if not bool(finite.all()):
        _note(name, "non-finite pixel values", int((~finite).sum()))
    if bool(run.all()):
        return _call(score, images, name)
    out = fill
    if bool(run.any()):
        idx = run.nonzero(as_tuple=True)[0]
        out = fill.index_put((idx,), _call(score, images[idx], name))
    return out


def _call(score: Callable[[Tensor], Tensor], images: Tensor, name: str) -> Tensor:
    # the whole batch at once; on an error or a non-finite score, one image at a time
    try:
        s = score(images).float().reshape(-1)
        if s.shape[0] == images.shape[0] and bool(torch.isfinite(s).all()):
            return s
        error = "non-finite score"
    except MEMBER_ERRORS as err:
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    if images.shape[0] == 1:
        _note(name, f"member failed ({error})", 1)
        return torch.full((1,), math.nan, device=images.device)
    return torch.cat([_call(score, images[i:i + 1], name) for i in range(images.shape[0])])


def fuse_available(normalized: Mapping[str, Tensor], weights: Mapping[str, float],
                   min_weight: float = MIN_SCORED_WEIGHT) -> Tensor:
    """Weighted mean (B,) of the finite normalised member scores, weights renormalised per image
    over the members that scored it; NaN (unscorable) where those hold less than ``min_weight``
    of the total weight. Equal to ``members.fuse_scores`` when every score is finite."""
    names = list(normalized)
    stacked = torch.stack([normalized[n] for n in names])                    # (M, B)
    ok = torch.isfinite(stacked)
    if bool(ok.all()):
        return fuse_scores(normalized, weights)
    w = torch.tensor([float(weights[n]) for n in names], device=stacked.device, dtype=stacked.dtype)[:, None]
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"fuse_available: weights of {names} sum to {total}, need > 0")
    scored = (w * ok).sum(0)                                                  # (B,)
    fused = (torch.where(ok, stacked, torch.zeros_like(stacked)) * w).sum(0) / scored.clamp_min(1e-12)
    return torch.where(scored >= min_weight * total, fused, torch.full_like(fused, math.nan))
