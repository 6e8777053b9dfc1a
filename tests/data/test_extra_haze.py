"""Extra haze on the paired data's inputs (`thicken_haze`, ``extra_haze``): the scattering model again."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from qualiteacher.data.datasets import CropDataset, thicken_haze, whole_image_view
from qualiteacher.data.records import ImageRecord


def _hazy_scene(t0: float, airlight: float = 0.85) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A scene with dark pixels in every patch (the prior's assumption) under haze of transmission
    t0, and a sky (the top rows, at infinite depth: transmission 0). Returns scene, t, hazy."""
    rng = np.random.default_rng(0)
    scene = rng.uniform(0.1, 0.7, (64, 64, 3)).astype(np.float32)
    scene[::4, ::4] = 0.0                                       # a black pixel in every 4 x 4 block
    t = np.full((64, 64, 1), t0, np.float32)
    t[:16] = 0.0
    return scene, t, (scene * t + airlight * (1 - t)).astype(np.float32)


def test_thicken_haze_is_the_scattering_model_at_the_product_of_transmissions():
    scene, t0, hazy = _hazy_scene(0.6)
    denser = thicken_haze(hazy, depth=0.5)
    t = t0 * math.exp(-0.5)
    # the airlight is estimated from the image (the haziest pixels, the sky), not given
    assert np.abs(denser - (scene * t + 0.85 * (1 - t))).max() < 1e-5
    assert denser.mean() > hazy.mean() and denser.std() < hazy.std()   # brighter, flatter: denser haze
    assert thicken_haze(hazy, 0.0) is hazy


def _files(tmp_path, lq: np.ndarray, gt: np.ndarray) -> ImageRecord:
    for name, image in (("lq", lq), ("gt", gt)):
        Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / f"{name}.png")
    return ImageRecord(id="a", lq=tmp_path / "lq.png", gt=tmp_path / "gt.png")


def test_extra_haze_thickens_about_half_the_inputs_and_their_context_never_the_target(tmp_path):
    scene, _, hazy = _hazy_scene(0.7)
    record = _files(tmp_path, hazy, scene)
    plain = CropDataset([record], 64, paired=True, augment=False, context_side=32)[0]
    data = CropDataset([record], 64, paired=True, augment=False, context_side=32, extra_haze=1.0)
    items = [data[0] for _ in range(40)]
    thick = [it for it in items if not torch.allclose(it["lq"], plain["lq"], atol=1e-6)]
    assert 10 <= len(thick) <= 30                                                # half the time
    for it in items:
        assert torch.equal(it["gt"], plain["gt"])                                # the target untouched
        assert it["lq"].mean() >= plain["lq"].mean() - 1e-6                      # only ever hazier
        # the context is the whole thickened input: the fusion reads the airlight the crop was hazed with
        assert torch.allclose(it["context"], whole_image_view(it["lq"].permute(1, 2, 0).numpy(), 32), atol=1e-5)
    again = CropDataset([record], 64, paired=True, augment=False, context_side=32, extra_haze=1.0)
    assert all(torch.equal(a["lq"], again[0]["lq"]) for a in items[:5])         # seeded: the same draws in order


def test_a_clean_pair_stays_clean_under_extra_haze(tmp_path):
    scene, _, hazy = _hazy_scene(0.7)
    data = CropDataset([_files(tmp_path, hazy, scene)], 64, paired=True, augment=False, clean_pairs=1.0,
                       extra_haze=2.0)
    for _ in range(10):
        item = data[0]
        assert torch.equal(item["lq"], item["gt"])


def test_negative_extra_haze_is_refused(tmp_path):
    scene, _, hazy = _hazy_scene(0.7)
    with pytest.raises(ValueError, match="extra_haze"):
        CropDataset([_files(tmp_path, hazy, scene)], 64, paired=True, extra_haze=-0.1)
