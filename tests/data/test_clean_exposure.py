"""Clean pairs at a shorter exposure (`darken_exposure`, ``clean_exposure``): a dim photo is clean too."""
import numpy as np
import pytest
import torch
from PIL import Image

from qualiteacher.data.datasets import CropDataset, darken_exposure, whole_image_view
from qualiteacher.data.records import ImageRecord


def _linear(x):
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def test_darken_exposure_scales_linear_light_by_two_to_the_minus_stops():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, (16, 16, 3)).astype(np.float32)
    one = darken_exposure(image, 1.0)
    assert np.allclose(_linear(one.astype(np.float64)), _linear(image.astype(np.float64)) / 2, atol=1e-6)
    # by hand: sRGB 0.5 is linear 0.2140; half of it, 0.1070, is sRGB 0.3613
    assert darken_exposure(np.full((1, 1, 3), 0.5, np.float32), 1.0)[0, 0, 0] == pytest.approx(0.3613, abs=1e-3)
    assert darken_exposure(image, 0.0) is image
    assert (darken_exposure(image, 1.5) <= one + 1e-6).all() and (one <= image + 1e-6).all()
    assert darken_exposure(np.zeros((2, 2, 3), np.float32), 2.0).max() == 0.0   # black stays black


def _record(tmp_path):
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.3, 0.9, (64, 64, 3))
    lq = gt * 0.1                                  # a dark input, far from the clean photo
    for name, image in (("lq", lq), ("gt", gt)):
        Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp_path / f"{name}.png")
    return ImageRecord(id="a", lq=tmp_path / "lq.png", gt=tmp_path / "gt.png")


def test_clean_pairs_are_dimmed_about_half_the_time_input_and_target_alike(tmp_path):
    record = _record(tmp_path)
    plain = CropDataset([record], 64, paired=True, augment=False, clean_pairs=1.0)[0]["gt"]
    data = CropDataset([record], 64, paired=True, augment=False, clean_pairs=1.0, clean_exposure=1.0,
                       context_side=32)
    items = [data[0] for _ in range(60)]
    ratios = []
    for item in items:
        assert torch.equal(item["lq"], item["gt"])                 # still a clean -> clean pair
        ratios.append(float(_linear(item["gt"].double().numpy()).mean() / _linear(plain.double().numpy()).mean()))
        dimmed = item["gt"].permute(1, 2, 0).numpy()
        assert torch.allclose(item["context"], whole_image_view(dimmed, 32), atol=1e-6)  # the context is the dim photo
    ratios = np.array(ratios)
    assert (ratios <= 1 + 1e-3).all() and (ratios >= 0.5 - 1e-2).all()  # never brighter, at most one stop darker
    dim = (ratios < 0.99).mean()
    assert 0.3 < dim < 0.7, dim                                     # about half
    again = CropDataset([record], 64, paired=True, augment=False, clean_pairs=1.0, clean_exposure=1.0,
                        context_side=32)
    assert all(torch.equal(again[0]["gt"], item["gt"]) for item in items)  # seeded


def test_degraded_pairs_are_untouched_and_a_negative_exposure_fails(tmp_path):
    record = _record(tmp_path)
    plain = CropDataset([record], 64, paired=True, augment=False)[0]
    data = CropDataset([record], 64, paired=True, augment=False, clean_exposure=2.0)
    for _ in range(10):
        item = data[0]
        assert torch.equal(item["lq"], plain["lq"]) and torch.equal(item["gt"], plain["gt"])
    with pytest.raises(ValueError, match="clean_exposure"):
        CropDataset([record], 64, paired=True, clean_exposure=-1.0)
    from qualiteacher.data.datamodule import RestorationDataModule
    with pytest.raises(ValueError, match="clean_exposure"):
        RestorationDataModule(labeled_root=str(tmp_path), clean_exposure=-0.5)
