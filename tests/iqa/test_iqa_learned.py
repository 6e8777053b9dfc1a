"""The learned-member study (``pipelines/study_learned_member.py``): its fit is deterministic, its
loss points the right way and its data are what it says (tiny generated photos, CPU, 32 px).
The study's figures (does the member transfer to report photos?) are in docs/iqa.md."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiteacher.iqa.audit_photos import split_of
from qualiteacher.iqa.destruction import greyout, heavy_blur

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pipelines"))
try:
    import study_learned_member as study
finally:
    sys.path.pop(0)

TINY = study.FitSettings(steps=3, batch=4, crops_per_photo=3, size=32, width=4)


def _photos(n: int = 2, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Colourful textured photos: smooth colour fields with fine luma texture."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        low = torch.rand(1, 3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0]
        img = img * (0.85 + 0.15 * torch.rand(1, size, size, generator=g))
        out[f"p{i}"] = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return out


@pytest.mark.parametrize("variant", ["photos", "rework", "mix"])
def test_fit_is_deterministic(variant: str) -> None:
    settings = study.FitSettings(**{**TINY.__dict__, **study.VARIANTS[variant]})
    a = study.fit_naturalness(settings, _photos(), log_every=0)
    b = study.fit_naturalness(settings, _photos(), log_every=0)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in a.parameters())


def test_fit_ranks_clean_above_damage_on_its_own_photos() -> None:
    """A short fit ranks its own clean crops above a blurred and a greyed copy: the loss points
    the right way (whether that transfers to other photos is the study's question)."""
    settings = study.FitSettings(steps=60, batch=8, crops_per_photo=8, size=32, width=4, lr=3e-3)
    photos = _photos(3)
    net = study.fit_naturalness(settings, photos, log_every=0)
    crops = torch.stack([torch.from_numpy(p[16:48, 16:48].copy()).permute(2, 0, 1).float() / 255
                         for p in photos.values()])
    clean = net(crops)
    assert (clean > net(heavy_blur(crops))).float().mean() >= 2 / 3
    assert (clean > net(greyout(crops))).float().mean() >= 2 / 3


def test_dead_leaves_are_images_in_the_palettes_colours() -> None:
    palette = torch.tensor([[0.8, 0.2, 0.1], [0.1, 0.5, 0.2]])
    x = study.dead_leaves(5, 32, palette, np.random.default_rng(0), disks=50)
    assert x.shape == (5, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    again = study.dead_leaves(5, 32, palette, np.random.default_rng(0), disks=50)
    assert torch.equal(x, again)
    # every image is made of the palette's hues: red over green or green over red, no blue
    assert (x[:, 2] < 0.35).float().mean() > 0.99
    assert x.flatten(1).std(1).min() > 0.02  # disks of both colours, not a flat image


def test_the_bundled_fit_photos_are_never_report_photos() -> None:
    photos = study.fit_photos()
    assert {"astronaut", "coffee"} <= set(photos)
    assert all(split_of(k) == "tune" for k in photos if k not in ("astronaut", "coffee"))
