"""Cropped consistency: the reward of a crop of the output must match the reward of the output of
the crop, so the student cannot game the IQA models with global tricks (reward hacking)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class ConsistencySettings:
    """METHOD.md §4's cropped consistency (stage 3's ``crop_*``)."""

    fraction: float                               # of each side
    windows: Literal["aligned", "independent"]    # one window for both sides, or two drawn apart (as released)
    start_step: int                               # the step N it starts at

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.fraction}")
        if self.windows not in ("aligned", "independent"):
            raise ValueError(f"crop_windows must be aligned or independent, got {self.windows!r}")


class CropWindow(NamedTuple):
    top: int
    left: int
    height: int
    width: int

    def __call__(self, x: Tensor) -> Tensor:
        return x[..., self.top:self.top + self.height, self.left:self.left + self.width]


def random_window(height: int, width: int, fraction: float = 0.5, multiple: int = 1,
                  generator: torch.Generator | None = None) -> CropWindow:
    """A window of ``fraction`` of each side (rounded down to ``multiple``), uniformly placed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    ch = max(multiple, int(height * fraction) // multiple * multiple)
    cw = max(multiple, int(width * fraction) // multiple * multiple)
    top = int(torch.randint(height - ch + 1, (1,), generator=generator))
    left = int(torch.randint(width - cw + 1, (1,), generator=generator))
    return CropWindow(top, left, ch, cw)


def crop_windows(s: ConsistencySettings, height: int, width: int, multiple: int = 1,
                 generator: torch.Generator | None = None) -> tuple[CropWindow, CropWindow]:
    """``(window of the output, window of the input)`` of one consistency comparison."""
    of_output = random_window(height, width, s.fraction, multiple, generator)
    if s.windows == "aligned":
        return of_output, of_output
    return of_output, random_window(height, width, s.fraction, multiple, generator)


def crop_consistency_loss(r_crop_of_output: Tensor, r_output_of_crop: Tensor) -> Tensor:
    """``mean |r(crop(S(x, 7))) - r(S(crop(x), 7))|`` over the batch."""
    return (r_crop_of_output - r_output_of_crop).abs().mean()
