"""A tile is restored as part of its image: the image-level statistics (the classical prior's
airlight, the image fusion's context vector) are measured once on the whole image and shared."""
import pytest
import torch
from torch import nn

from qualiteacher.archs.context import image_context
from qualiteacher.archs.fidelity import ImageFusion
from qualiteacher.archs.output import StudentOutput
from qualiteacher.archs.presets import build_iqpir
from qualiteacher.classical import CLASSICAL
from qualiteacher.training.restore import context_image, restore


def _hazy_half(h: int = 64, w: int = 192) -> torch.Tensor:
    """A textured scene under bluish haze, dense on the left, thinning smoothly to none on the right."""
    g = torch.Generator().manual_seed(0)
    scene = 0.15 + 0.7 * torch.rand(1, 3, h // 4, w // 4, generator=g)
    scene = nn.functional.interpolate(scene, size=(h, w), mode="bilinear", align_corners=False)
    t = torch.linspace(0.2, 1.0, w).clamp(max=1.0).sqrt().expand(1, 1, h, w)
    airlight = torch.tensor([0.75, 0.8, 0.95])[None, :, None, None]
    return scene * t + airlight * (1 - t)


@pytest.mark.parametrize("name", sorted(n for n, m in CLASSICAL.items() if m.statistics is not None))
def test_a_restorer_given_its_own_statistics_is_unchanged_and_other_statistics_change_it(name):
    method, x = CLASSICAL[name], _hazy_half(48, 96)
    stats = method.statistics(x)
    assert torch.allclose(method.fn(x, **stats), method.fn(x), atol=1e-6)
    other = method.statistics(x[..., 48:])  # the clear right half measures something else
    assert not torch.allclose(method.fn(x, **other), method.fn(x), atol=1e-3)


def _net_with_a_trained_looking_fusion():
    torch.manual_seed(0)
    net = build_iqpir("tiny", prior="dcp").eval()
    head = net.fidelity.image.head
    with torch.no_grad():  # zero-initialised: give the head weights so its context and prior matter
        head.weight.normal_(0, 0.05)
        head.bias.normal_(0, 0.05)
        net.fidelity.image.context.weight.mul_(5)
    return net


def test_a_fixed_context_of_the_same_images_changes_nothing_and_serves_tiles_position_after_position():
    net, x = _net_with_a_trained_looking_fusion(), torch.cat([_hazy_half(), _hazy_half().flip(-1)])
    level = torch.tensor([7, 3])
    with torch.no_grad():
        plain = net(x, level).image
        with image_context(net, x, lambda im: net(im, level)) as fixed:
            assert fixed
            recorded = net.fidelity.image.fixed
            assert recorded.vector.shape[0] == 2 and recorded.prior["airlight"].shape == (2, 3)
            same = net(x, level).image
            twice = net(torch.cat([x, x]), level.repeat(2)).image  # two positions of the 2 images
            with pytest.raises(ValueError, match="cannot serve a batch"):
                net(x[:1].repeat(3, 1, 1, 1), level[:1].repeat(3))
        assert net.fidelity.image.fixed is None  # nothing stays fixed after the block
    assert plain.abs().max() < 5  # the net's output is in a sane range: the tolerances below mean something
    assert torch.allclose(same, plain, atol=1e-4)
    assert torch.allclose(twice, torch.cat([plain, plain]), atol=1e-4)
    assert not any("fixed" in k or "recorded" in k for k in net.state_dict())


class _FusionOnly(nn.Module):
    """A local feature and an image fusion with the dark channel prior, its head given weights: a
    model whose only image-level statistics are the fusion's (an untrained IQPIR's group norms and
    attention would hide them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feature = nn.Conv2d(3, 4, 3, padding=1)
        self.fusion = ImageFusion(1, 4, 4, width=8, prior="dcp")
        with torch.no_grad():
            self.fusion.head.weight.normal_(0, 0.05)
            self.fusion.head.bias.normal_(0, 0.05)

    def forward(self, x, level=None):
        f = torch.tanh(self.feature(x))
        return StudentOutput(self.fusion(x, f, f, x, 1.0).image, x.new_zeros(()))


def test_tiles_restored_with_their_images_context_stay_closer_to_the_whole():
    # tiles of the clear right part, alone, find little haze: their own airlight is a bright scene
    # colour and their context a clear image's. With the whole image's, the tiles agree with the
    # whole (what is left: the prior's local windows cut at tile borders, 0.005 alone here)
    import qualiteacher.training.restore as R

    net, x = _FusionOnly().eval(), _hazy_half(128, 384)
    whole = restore(net, x, tile=0)
    with_context = restore(net, x, tile=96, overlap=16)
    original = R.image_context
    try:  # each tile measuring its own, as before the context pass
        R.image_context = lambda *args: _nothing()
        without_context = restore(net, x, tile=96, overlap=16)
    finally:
        R.image_context = original
    err_with = (with_context - whole).abs().mean()
    err_without = (without_context - whole).abs().mean()
    assert err_with < 0.5 * err_without, (err_with, err_without)  # measured 0.010 vs 0.024


class _nothing:
    def __enter__(self):
        return False

    def __exit__(self, *exc):
        return False


def test_the_context_image_is_the_whole_image_downscaled_within_the_side():
    u8 = (torch.rand(2, 3, 300, 200) * 255).to(torch.uint8)
    small = context_image(u8, 128, 8, torch.device("cpu"))
    assert small.dtype == torch.float32 and small.shape == (2, 3, 128, 88) and 0 <= small.min() and small.max() <= 1
    assert (small.mean() - u8.float().mean() / 255).abs() < 0.01
    # fits already: only rounded to the multiple
    assert context_image(u8.float() / 255, 512, 8, torch.device("cpu")).shape == (2, 3, 304, 200)


def _spy_airlights(net):
    """Record the airlight every forward's dark channel prior is given."""
    seen, fusion = [], net.fidelity.image
    fn = fusion.prior_fn

    def spy(x, **stats):
        seen.append(stats["airlight"].clone())
        return fn(x, **stats)

    fusion.prior_fn = spy
    return seen


def test_a_training_crop_takes_the_airlight_of_its_whole_image_and_keeps_its_own_context_vector():
    from qualiteacher.archs.context import fixed_prior_statistics, prior_statistics, select_statistics
    from qualiteacher.classical.dark_channel import airlight_of

    net = _net_with_a_trained_looking_fusion()
    whole = torch.cat([_hazy_half(64, 128), _hazy_half(64, 128).flip(-1)])      # 2 images
    crops = whole[..., 16:48, 96:128].clone()                                   # the clear end of each
    stats = prior_statistics(net, whole)
    assert torch.allclose(stats["airlight"], airlight_of(whole))
    assert not torch.allclose(airlight_of(crops), stats["airlight"], atol=1e-2)  # a crop alone is biased
    seen = _spy_airlights(net)
    with torch.no_grad():
        own = net(crops, None).image
        with fixed_prior_statistics(net, stats):
            given = net(crops, None).image
            net(torch.cat([crops, crops]), None)                                 # two views, position after position
            rows = torch.tensor([1, 1, 0])
        with fixed_prior_statistics(net, select_statistics(stats, rows)):
            net(crops[rows], None)                                               # a batch built by indexing
        after = net(crops, None).image
    assert torch.allclose(seen[0], airlight_of(crops)) and torch.allclose(seen[1], stats["airlight"])
    assert torch.allclose(seen[2], stats["airlight"].repeat(2, 1))
    assert torch.allclose(seen[3], stats["airlight"][rows])
    assert torch.allclose(seen[4], airlight_of(crops))                          # nothing stays fixed after the block
    assert not torch.allclose(own, given, atol=1e-3) and torch.equal(after, own)
    assert net.fidelity.image.fixed is None
    with fixed_prior_statistics(net, None):                                      # None: each batch its own
        assert net.fidelity.image.fixed is None


def test_the_prior_statistics_of_a_fusion_without_them_are_none():
    from qualiteacher.archs.context import prior_statistics

    assert prior_statistics(build_iqpir("tiny", prior="lime"), torch.rand(1, 3, 32, 32)) is None  # local only
    assert prior_statistics(build_iqpir("tiny"), torch.rand(1, 3, 32, 32)) is None


def test_crops_carry_their_whole_image_and_a_clean_pair_the_clean_image(tmp_path):
    import numpy as np
    from PIL import Image

    from qualiteacher.data.datasets import CropDataset, whole_image_view
    from qualiteacher.data.records import ImageRecord

    rng = np.random.default_rng(0)
    lq, gt = (rng.integers(0, 256, (80, 64, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(lq).save(tmp_path / "lq.png")
    Image.fromarray(gt).save(tmp_path / "gt.png")
    record = ImageRecord(id="a", lq=tmp_path / "lq.png", gt=tmp_path / "gt.png")
    item = CropDataset([record], 32, paired=True, context_side=48)[0]
    assert item["lq"].shape == (3, 32, 32) and item["context"].shape == (3, 48, 48)
    assert torch.allclose(item["context"], whole_image_view(lq.astype(np.float32) / 255, 48), atol=1e-6)
    clean = CropDataset([record], 32, paired=True, context_side=48, clean_pairs=1.0)[0]
    assert torch.allclose(clean["context"], whole_image_view(gt.astype(np.float32) / 255, 48), atol=1e-6)
    assert "context" not in CropDataset([record], 32, paired=True)[0]
    unpaired = CropDataset([record], 32, paired=False, context_side=48)[0]
    assert torch.allclose(unpaired["context"], item["context"])
