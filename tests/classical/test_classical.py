"""Classical restorers (`qualiteacher.classical`) on hand-made images: the dark channel prior undoes
a known haze, gamma hits its target mean, CLAHE and LIME brighten and keep hue, the top-hat removes
white streaks only; every catalogue entry is batched, shape- and device-preserving."""
from __future__ import annotations

import math

import kornia
import pytest
import torch

from qualiteacher.classical import CLASSICAL, DEFAULT_CLASSICAL, classical_restorer, default_classical, list_classical
from qualiteacher.classical.clahe import clahe
from qualiteacher.classical.dark_channel import dark_channel, dark_channel_prior, estimate_airlight, transmission
from qualiteacher.classical.filters import fit_window, max_filter, min_filter
from qualiteacher.classical.gamma import gamma_for_mean, gamma_to_mean
from qualiteacher.classical.lime import lime
from qualiteacher.classical.streaks import suppress_streaks


def _haze_free(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random colours with one nearly black channel per pixel: a dark channel of about 0, as the
    prior assumes of haze-free outdoor patches."""
    g = torch.Generator().manual_seed(seed)
    clean = 0.2 + 0.8 * torch.rand(b, 3, h, w, generator=g)
    channel = torch.randint(0, 3, (b, 1, h, w), generator=g)
    return clean.scatter(1, channel, 0.02 * torch.rand(b, 1, h, w, generator=g))


def _smooth_colours(b: int = 2, side: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth saturated colour fields (a coarse random grid, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = 0.15 + 0.85 * torch.rand(b, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)


def test_dark_channel_prior_recovers_a_known_haze() -> None:
    # I = J t + A (1 - t): transmission 0.3 -> 0.9 across the image, a sky strip (t = 0.02) on top
    b, h, w = 2, 64, 64
    clean = _haze_free(b, h, w)
    t = (0.3 + 0.6 * torch.linspace(0, 1, w)).view(1, 1, 1, w).repeat(b, 1, h, 1)
    t[..., :8, :] = 0.02
    airlight = torch.tensor([[0.9, 0.85, 0.8], [0.75, 0.8, 0.9]])
    hazy = clean * t + airlight[:, :, None, None] * (1 - t)

    patch = fit_window(15, 64)
    estimated = estimate_airlight(hazy, dark_channel(hazy, patch))
    assert (estimated - airlight).abs().max() < 0.03        # the sky's colour, to within 0.03 per channel
    coarse = transmission(hazy, estimated, patch, omega=1.0)
    assert (coarse - t)[..., 16:, :].abs().mean() < 0.05    # below the sky: t to within 0.05
    out = dark_channel_prior(hazy)
    scene = (t >= 0.3).expand_as(clean)
    err, before = (out - clean)[scene].abs().mean(), (hazy - clean)[scene].abs().mean()
    assert err < 0.08 and err < 0.4 * before               # stated error: MAE 0.08 (input: 0.18)


def test_dark_channel_leaves_a_haze_free_image_nearly_as_it_is() -> None:
    clean = _haze_free(1, 48, 48)
    clean[..., :4, :4] = 1.0  # a white patch: the "airlight" of a clear scene
    out = dark_channel_prior(clean)
    assert (out - clean).abs().mean() < 0.05


def test_fit_window_shrinks_on_small_images_only() -> None:
    assert fit_window(15, 600) == 15 and fit_window(15, 96) == 15
    assert fit_window(15, 64) == 9 and fit_window(15, 32) == 5 and fit_window(15, 8) == 3
    assert all(fit_window(15, s) % 2 == 1 for s in range(4, 200))


@pytest.mark.parametrize("scale", [0.05, 0.2, 0.9])
def test_gamma_hits_its_target_mean(scale: float) -> None:
    images = scale * torch.rand(3, 3, 32, 40) ** 2
    out = gamma_to_mean(images)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.full((3,), 0.45), atol=1e-4)
    g = gamma_for_mean(images, 0.3)
    assert torch.allclose(images.pow(g[:, None, None, None]).mean(dim=(1, 2, 3)), torch.full((3,), 0.3), atol=1e-4)
    assert ((g < 1) == (images.mean(dim=(1, 2, 3)) < 0.3)).all()  # dark images brighten, bright ones darken


def test_gamma_of_a_black_image_stays_black() -> None:
    assert gamma_to_mean(torch.zeros(1, 3, 16, 16)).max() < 1e-3


def _hue_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean circular hue difference (radians) over coloured, unclipped pixels."""
    ha, hb = kornia.color.rgb_to_hsv(a), kornia.color.rgb_to_hsv(b)
    mask = (ha[:, 1] > 0.2) & (hb[:, 1] > 0.2) & (b.amax(dim=1) < 0.999) & (a.amax(dim=1) > 0.02)
    diff = (ha[:, 0] - hb[:, 0]).abs()[mask]
    return float(torch.minimum(diff, 2 * math.pi - diff).mean())


@pytest.mark.parametrize("method", [clahe, lime])
def test_clahe_and_lime_brighten_a_dark_image_and_keep_hue(method) -> None:
    dark = 0.12 * _smooth_colours()
    out = method(dark)
    assert (out.mean(dim=(1, 2, 3)) > 2.5 * dark.mean(dim=(1, 2, 3))).all()
    assert _hue_error(dark, out) < 0.02


def test_tophat_removes_white_streaks_and_keeps_coloured_lines() -> None:
    background = 0.5 * _smooth_colours(1, 48)
    rainy, coloured = background.clone(), background.clone()
    idx = torch.arange(48)
    rainy[0, :, idx, idx] = rainy[0, :, idx, idx] + 0.6 * (1 - rainy[0, :, idx, idx])   # a white streak
    coloured[0, 0, idx, idx] = 1.0                                                          # a red line
    assert (suppress_streaks(rainy) - background).abs().mean() < 0.25 * (rainy - background).abs().mean()
    assert torch.equal(suppress_streaks(coloured), coloured)  # no channel-common brightening: untouched


def test_catalogue_names_and_defaults() -> None:
    assert set(DEFAULT_CLASSICAL) == {"dehaze", "derain", "desnow", "lowlight"}
    assert all(name in CLASSICAL for name in DEFAULT_CLASSICAL.values())
    assert list_classical() == sorted(CLASSICAL)
    assert list_classical("lowlight")[:3] == ["clahe", "gamma", "lime"]
    assert classical_restorer("dehaze") is CLASSICAL["dcp"].fn and default_classical("lowlight") == "lime"
    with pytest.raises(ValueError, match="unknown classical restorer 'nope'"):
        classical_restorer("nope")
    with pytest.raises(ValueError, match="no classical restorer"):
        default_classical("deblur")


@pytest.mark.parametrize("name", sorted(CLASSICAL))
def test_every_classical_restorer_is_batched(name: str) -> None:
    fn = classical_restorer(name)
    images = torch.cat([0.3 * _smooth_colours(1, 40, 1), 0.7 * torch.rand(1, 3, 40, 40) + 0.2])
    out = fn(images)
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    one_by_one = torch.cat([fn(images[i:i + 1]) for i in range(images.shape[0])])
    assert torch.allclose(out, one_by_one, atol=1e-5)
    assert fn(torch.rand(1, 3, 24, 37)).shape == (1, 3, 24, 37)  # small, odd sizes


@pytest.mark.parametrize("size", [1, 3, 15, 31])
def test_separable_window_filters_equal_the_square_window(size: int) -> None:
    x = torch.rand(2, 3, 37, 29, generator=torch.Generator().manual_seed(size))
    p = size // 2
    square = torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (p, p, p, p), mode="replicate"), size, stride=1)
    assert torch.equal(max_filter(x, size), square)
    assert torch.equal(min_filter(x, size), -torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(-x, (p, p, p, p), mode="replicate"), size, stride=1))
