"""Colour measures (`qualiteacher.eval.colour`) on hand-made pairs."""
from __future__ import annotations

import pytest
import torch

from qualiteacher.eval.colour import delta_e, opponent_channels, opponent_correlation


def _colours(b: int = 3, side: int = 32) -> torch.Tensor:
    coarse = torch.rand(b, 3, 4, 4)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)


def test_identical_images_correlate_1_with_delta_e_0() -> None:
    x = _colours()
    assert torch.allclose(opponent_correlation(x, x), torch.ones(3))
    assert torch.allclose(delta_e(x, x), torch.zeros(3), atol=1e-4)


def test_a_greyscale_copy_loses_the_colour() -> None:
    x = _colours()
    grey = x.mean(dim=1, keepdim=True).expand_as(x)
    assert (opponent_correlation(grey, x) < 0.2).all()   # constant opponent channels: 0 by definition
    assert (delta_e(grey, x) > 5.0).all()
    assert torch.allclose(opponent_correlation(grey, grey), torch.ones(3))  # grey for a grey reference: 1


def test_correlation_ignores_gain_and_offset_but_not_swapped_channels() -> None:
    x = _colours()
    assert torch.allclose(opponent_correlation(0.6 * x + 0.2, x), torch.ones(3), atol=1e-5)
    swapped = x.flip(dims=(1,))  # RGB -> BGR: the yellow-blue axis turns over
    assert (opponent_correlation(swapped, x) < 0.5).all()
    assert (delta_e(0.6 * x + 0.2, x) > 1.0).all()  # ΔE sees the change the correlation forgives


def test_delta_e_of_black_and_white_is_100() -> None:
    black, white = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    assert torch.allclose(delta_e(black, white), torch.tensor([100.0]), atol=0.05)


def test_opponent_channels_of_pure_colours() -> None:
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    blue = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert opponent_channels(red).flatten().tolist() == [1.0, 0.5]
    assert opponent_channels(blue).flatten().tolist() == [0.0, -1.0]


def test_colour_measures_are_batched_and_check_shapes() -> None:
    x, y = _colours(4), _colours(4)
    for fn in (opponent_correlation, delta_e):
        batched = fn(x, y)
        assert batched.shape == (4,)
        assert torch.allclose(batched, torch.cat([fn(x[i:i + 1], y[i:i + 1]) for i in range(4)]), atol=1e-5)
        with pytest.raises(ValueError, match="shapes differ"):
            fn(x, y[..., :16])
        with pytest.raises(ValueError, match="RGB batches"):
            fn(x[:, :1], y[:, :1])
