"""Geometric views for test-time-augmented pseudo-labels, each with its exact inverse."""
from __future__ import annotations

import torch
from torch import Tensor

VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "rot90")


def apply_view(x: Tensor, view: str) -> Tensor:
    """Transform a ``(..., H, W)`` batch by the named view."""
    if view == "identity":
        return x
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    if view == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")


def invert_view(x: Tensor, view: str) -> Tensor:
    """Map a result computed in the view's frame back to the original frame."""
    if view == "rot90":
        return torch.rot90(x, -1, dims=(-2, -1))
    return apply_view(x, view)  # flips are their own inverse


def check_views(views: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a configured list of views (non-empty, known names, no repeats)."""
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct names from {VIEWS}, got {views}")
    return views
