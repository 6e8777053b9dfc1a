import pytest
import torch

from qualiteacher.archs import StudentOutput
from qualiteacher.archs.iqpir import IQPIRNet, IQPIRResult, freeze_prior_, init_from_stage1
from qualiteacher.archs.presets import (
    ParameterCount, build_autoencoder, build_iqpir, build_unet, count_parameters, get_preset, list_presets,
)

RUNNABLE = {"tiny": 32, "base": 32}  # base at a small input


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_on_meta(name):
    with torch.device("meta"):
        build_autoencoder(name)
        build_iqpir(name, "add")
        build_iqpir(name, "adaln", fusion="attn")
        build_unet(name)
    counts = count_parameters(name)
    assert isinstance(counts, ParameterCount) and 0 < counts.iqpir_trainable < counts.iqpir


def test_paper_parameter_count():
    counts = count_parameters("paper")
    # CodeFormer-sized: ~73 M autoencoder, ~104 M IQPIR in total (fusion blocks at 4 scales:
    # ~10.6 M), ~60 M trained in stage 3 (LQ encoder, transformer, conditioning, fusion)
    assert 60e6 < counts.autoencoder < 90e6
    assert 90e6 < counts.iqpir < 115e6
    assert 50e6 < counts.iqpir_trainable < 70e6
    assert count_parameters("paper", "adaln").iqpir > counts.iqpir
    p = get_preset("paper")
    assert p.latent_grid == 16 and p.latent_channels == 256 and p.codes_common == p.codes_hq == 1024


def test_unknown_preset():
    with pytest.raises(KeyError, match="known: base, demo, paper, paper-smoke, tiny"):
        build_iqpir("huge")


@pytest.mark.parametrize("name", sorted(RUNNABLE))
@pytest.mark.parametrize("cond_mode", ["add", "adaln"])
def test_forward_backward_cpu(name, cond_mode):
    torch.manual_seed(0)
    size = RUNNABLE[name]
    ae = build_autoencoder(name)
    x = torch.rand(2, 3, size, size)
    out = ae(x, torch.tensor([0.9, float("nan")]))
    loss = (out.image - x).abs().mean() + out.quant.loss
    loss.backward()
    assert out.image.shape == x.shape and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in ae.parameters() if p.grad is not None)

    net = init_from_stage1(build_iqpir(name, cond_mode), ae)
    res = net.predict(x, torch.tensor([7, 0]))
    assert isinstance(res, IQPIRResult) and res.image.shape == x.shape
    grid = size // net.downscale
    assert res.logits_common.shape == (2, grid, grid, get_preset(name).codes_common)
    res.image.mean().backward()
    assert net.lq_encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through codes
    assert all(p.grad is None for p in net.decoder.parameters())

    unet = build_unet(name)
    uo = unet(x, torch.tensor([3, 5]))
    assert isinstance(uo, StudentOutput) and uo.image.shape == x.shape
    (uo.image.mean() + uo.aux_loss).backward()
    assert torch.isfinite(uo.image).all()


def test_iqpir_student_contract_and_padding():
    torch.manual_seed(0)
    net = build_iqpir("tiny")
    x = torch.rand(2, 3, 30, 37)  # not a multiple of the downscale
    out = net(x, None)
    assert isinstance(out, StudentOutput) and out.image.shape == x.shape
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    res = net.predict(x, None)
    # decoder input is exactly a fused codebook entry (outputs stay on the codebook)
    idx_c, idx_h = res.logits_common.argmax(-1), res.logits_hq.argmax(-1)
    assert torch.allclose(res.latent, net.codebook.codes_from_indices(idx_c, idx_h), atol=1e-5)


def test_init_from_stage1_freezes_prior():
    torch.manual_seed(0)
    ae = build_autoencoder("tiny")
    net = build_iqpir("tiny")
    assert not net.prior_frozen()
    init_from_stage1(net, ae)
    assert net.prior_frozen()
    assert torch.equal(net.lq_encoder.conv_in.weight, ae.encoder.conv_in.weight)
    assert torch.equal(net.codebook.hq.embedding.weight, ae.codebook.hq.embedding.weight)
    net.train()
    assert net.lq_encoder.training and not net.decoder.training and not net.codebook.training
    assert all(p.requires_grad for p in net.transformer.parameters())
    # the copy is independent of the stage-1 model
    with torch.no_grad():
        net.lq_encoder.conv_in.weight.add_(1.0)
    assert not torch.equal(net.lq_encoder.conv_in.weight, ae.encoder.conv_in.weight)
    with pytest.raises(ValueError, match="does not match"):
        init_from_stage1(build_iqpir("tiny"), build_autoencoder("base"))


def test_freeze_prior_function():
    net = freeze_prior_(build_iqpir("tiny"))
    assert isinstance(net, IQPIRNet) and net.prior_frozen()


def test_bad_inputs():
    net = build_iqpir("tiny")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(1, 1, 32, 32), None)
    with pytest.raises(ValueError, match="0..7"):
        net(torch.rand(1, 3, 32, 32), torch.tensor([8]))
    with pytest.raises(TypeError, match="integer"):
        net(torch.rand(1, 3, 32, 32), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="divisible"):
        build_autoencoder("tiny")(torch.rand(1, 3, 30, 32))
