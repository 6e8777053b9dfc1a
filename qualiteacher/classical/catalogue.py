"""The classical restorers by name: an explicit table, `list_classical`, `classical_restorer`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from qualiteacher.classical.clahe import clahe
from qualiteacher.classical.dark_channel import airlight_of, dark_channel_prior
from qualiteacher.classical.gamma import gamma_for_mean, gamma_to_mean
from qualiteacher.classical.lime import lime
from qualiteacher.classical.streaks import streaks_and_veil, suppress_streaks, veil_airlight

# a classical restorer: (B, 3, H, W) in [0, 1] -> the same shape in [0, 1], on the input's device
ClassicalFn = Callable[..., Tensor]
# its image-level statistics: (B, 3, H, W) -> {keyword of fn: (B, ...) tensor}
Statistics = Callable[[Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class ClassicalMethod:
    """A classical restorer. ``statistics``, for a method that reads a statistic of the whole image
    (the airlight of the dark channel prior, the gamma of a mean), computes it, to be passed back
    to ``fn`` as keywords: a tile is then restored as part of its image (the statistic measured
    once on a downscaled copy of the whole), not as an image of its own."""

    name: str
    task: str          # the degradation it is made for (any image can be given to any method)
    fn: ClassicalFn
    summary: str
    statistics: Statistics | None = None


CLASSICAL: dict[str, ClassicalMethod] = {m.name: m for m in (
    ClassicalMethod("dcp", "dehaze", dark_channel_prior,
                    "dark channel prior (He et al. 2009), guided-filter refined transmission",
                    lambda x: {"airlight": airlight_of(x)}),
    ClassicalMethod("gamma", "lowlight", gamma_to_mean, "one gamma curve per image, mean to 0.45",
                    lambda x: {"gamma": gamma_for_mean(x)}),
    ClassicalMethod("clahe", "lowlight", clahe, "CLAHE of the HSV value channel (hue kept)"),
    ClassicalMethod("lime", "lowlight", lime,
                    "illumination map in the spirit of LIME (max of RGB, guided-filter refined, gamma 0.8)"),
    ClassicalMethod("tophat", "derain", suppress_streaks,
                    "achromatic white top-hat of a flat 3-px opening, soft-thresholded"),
    ClassicalMethod("tophat_dcp", "derain", streaks_and_veil,
                    "streaks by the achromatic top-hat, then the veil by the dark channel prior",
                    lambda x: {"airlight": veil_airlight(x)}),
)}

# each task's default classical baseline: the best of its methods on the demo's val split (PSNR and
# SSIM; docs/results.md "Classical baselines"). Snow's veil is the haze model, and its flakes are too
# large for a flat filter that keeps texture: the dark channel prior alone.
DEFAULT_CLASSICAL: dict[str, str] = {"dehaze": "dcp", "lowlight": "lime", "derain": "tophat_dcp",
                                     "desnow": "dcp"}


def list_classical(task: str | None = None) -> list[str]:
    """Names of the classical restorers (those made for ``task`` first, when given)."""
    names = sorted(CLASSICAL)
    return names if task is None else sorted(names, key=lambda n: CLASSICAL[n].task != task)


def classical_restorer(name: str) -> ClassicalFn:
    """The restorer ``name`` (see `list_classical`); a task name gives that task's default."""
    name = DEFAULT_CLASSICAL.get(name, name)
    if name not in CLASSICAL:
        raise ValueError(f"unknown classical restorer {name!r}: choose one of {', '.join(list_classical())} "
                         f"or a task ({', '.join(DEFAULT_CLASSICAL)})")
    return CLASSICAL[name].fn


def classical_method(name: str) -> ClassicalMethod:
    """The :class:`ClassicalMethod` ``name`` (a task name gives that task's default)."""
    classical_restorer(name)  # the error for an unknown name
    return CLASSICAL[DEFAULT_CLASSICAL.get(name, name)]


def default_classical(task: str) -> str:
    """The name of ``task``'s default classical restorer."""
    if task not in DEFAULT_CLASSICAL:
        raise ValueError(f"no classical restorer for task {task!r} (tasks: {', '.join(DEFAULT_CLASSICAL)})")
    return DEFAULT_CLASSICAL[task]
