"""Rain streaks and snow flakes by a flat morphological filter, and the veil behind them by the
dark channel prior.

A streak or flake adds light of no colour of its own (``I = J + a (1 - J)``: towards white), in
structures thinner than a few pixels. The flat opening (`filters.opening`) of each channel removes
bright structures narrower than its window; the difference ``I - opening(I)`` (the white top-hat)
holds them and the image's own bright fine texture. Taking its minimum over the channels keeps what
brightened every channel alike (white streaks, not coloured texture), and a soft threshold leaves
the faint residual of texture and noise alone. What rain and snow leave besides is a veil, a blend
of the whole image towards a grey airlight: the haze model with one transmission, which the dark
channel prior inverts (`dark_channel.dark_channel_prior`).
"""
from __future__ import annotations

from torch import Tensor

from qualiteacher.classical.dark_channel import airlight_of, dark_channel_prior
from qualiteacher.classical.filters import opening

WINDOW = 3        # opening window: the demo's streaks are 1-3 px wide (5 px erased texture on val)
THRESHOLD = 0.05  # soft threshold of the achromatic top-hat (0.03-0.08 within 0.3 dB on val)


def white_tophat(images: Tensor, size: int = WINDOW) -> Tensor:
    """``(B, 1, H, W)``: the brightening common to all channels, ``min_c (I - opening(I))`` >= 0."""
    return (images - opening(images, size)).amin(dim=1, keepdim=True)


def suppress_streaks(images: Tensor, size: int = WINDOW, threshold: float = THRESHOLD) -> Tensor:
    """Subtract the achromatic top-hat above ``threshold`` from every channel of ``(B, 3, H, W)``."""
    return (images - (white_tophat(images, size) - threshold).clamp_min(0.0)).clamp(0.0, 1.0)


def streaks_and_veil(images: Tensor, size: int = WINDOW, threshold: float = THRESHOLD,
                     airlight: Tensor | None = None) -> Tensor:
    """`suppress_streaks`, then the veil removed by `dark_channel_prior` (streaks first: white
    streaks would otherwise pass for the haziest pixels, the airlight). ``airlight`` (B, 3): the
    veil's airlight (`veil_airlight` of the whole image, for a tile); None estimates it here."""
    return dark_channel_prior(suppress_streaks(images, size, threshold), airlight=airlight)


def veil_airlight(images: Tensor, size: int = WINDOW, threshold: float = THRESHOLD) -> Tensor:
    """``(B, 3)``: the airlight `streaks_and_veil` estimates for ``images`` (after the streaks)."""
    return airlight_of(suppress_streaks(images, size, threshold))
