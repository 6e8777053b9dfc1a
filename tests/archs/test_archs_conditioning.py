import pytest
import torch

from qualiteacher.archs.conditioning import LevelEmbedding, QualityConditioning
from qualiteacher.archs.iqpir import init_from_stage1
from qualiteacher.archs.presets import build_autoencoder, build_iqpir, build_unet

LOW, HIGH = torch.zeros(4, dtype=torch.long), torch.full((4,), 7, dtype=torch.long)


def _iqpir(cond_mode):
    torch.manual_seed(0)
    ae = build_autoencoder("tiny")
    # a trained codebook has spread-out codes; the default init is nearly collapsed
    torch.nn.init.normal_(ae.codebook.common.embedding.weight)
    torch.nn.init.normal_(ae.codebook.hq.embedding.weight, std=0.5)
    return init_from_stage1(build_iqpir("tiny", cond_mode), ae)


def _reachable_range(net) -> float:
    """Brightness spread of the frozen decoder over constant code maps (each code of one book with
    code 0 of the other): about the most a level can move an IQPIR output whose decoder input stays
    on codebook entries."""
    k1, k2 = net.codebook.common.num_codes, net.codebook.hq.num_codes
    c = torch.cat([torch.arange(k1), torch.zeros(k2, dtype=torch.long)])[:, None, None].expand(-1, 8, 8)
    h = torch.cat([torch.zeros(k1, dtype=torch.long), torch.arange(k2)])[:, None, None].expand(-1, 8, 8)
    with torch.no_grad():
        means = net.decoder(net.codebook.codes_from_indices(c.contiguous(), h.contiguous())).mean((1, 2, 3))
    return float(means.max() - means.min())


STUDENTS = {
    "iqpir-add": lambda: _iqpir("add"),
    "iqpir-adaln": lambda: _iqpir("adaln"),
    "unet": lambda: (torch.manual_seed(0), build_unet("tiny"))[1],
}


def test_level_embedding_is_plug_in():
    emb = LevelEmbedding(8, 5)
    feat = torch.randn(3, 5, 4, 4)
    assert torch.equal(emb(feat, torch.tensor([0, 3, 7])), feat)  # zero-initialised
    assert emb(feat, None) is feat
    with torch.no_grad():
        emb.embedding.weight[3] = 1.0
    assert torch.allclose(emb(feat, torch.tensor([0, 3, 7]))[1], feat[1] + 1)
    with pytest.raises(ValueError, match="mode"):
        QualityConditioning("film", 8, 4, 4)


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_fresh_conditioning_ignores_level(kind):
    net = STUDENTS[kind]().eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        base = net(x, None).image
        for level in (LOW, HIGH, torch.tensor([1, 2, 5, 6])):
            assert torch.allclose(net(x, level).image, base, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_conditioning_learns_brightness(kind):
    """Toy objective rewarding brightness at level 7 and darkness at level 0: only the level path
    can separate the two outputs, so a gap proves it trains (for IQPIR through the ST codes)."""
    net = STUDENTS[kind]().train()
    # IQPIR: a third of the brightness range its frozen prior can reach; U-Net: free output
    needed = 0.3 * _reachable_range(net) if kind.startswith("iqpir") else 0.05
    torch.manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=32, mode="bilinear")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(30):
        loss = net(x, LOW).image.mean() - net(x, HIGH).image.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        gap = net(x, HIGH).image.mean() - net(x, LOW).image.mean()
    assert gap > needed, f"{kind}: level 7 not brighter than level 0 (gap {gap:.4f})"
