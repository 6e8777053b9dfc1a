import pytest
import torch

from qualiteacher.archs.quantize import Quantized, VectorQuantizer, nearest_code, perplexity_of


def test_round_trip_and_nearest():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 5, 6)
    out = vq(z)
    assert isinstance(out, Quantized)
    assert out.indices.shape == (2, 5, 6) and out.indices.dtype == torch.long
    assert torch.allclose(vq.codes_from_indices(out.indices), out.quantized, atol=1e-6)
    # indices are the true nearest codes (brute force)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, vq.embedding.weight).argmin(1)
    assert torch.equal(out.indices.flatten(), brute)
    assert torch.equal(nearest_code(flat, vq.embedding.weight), brute)


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Conv2d(3, 4, 1)
    vq = VectorQuantizer(8, 4)
    out = vq(encoder(torch.randn(2, 3, 4, 4)))
    (out.quantized.square().mean() + out.loss).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert vq.embedding.weight.grad.abs().sum() > 0  # codebook loss trains the codes


def test_loss_value_and_mask():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, beta=0.25)
    z = torch.randn(4, 3, 2, 2)
    out = vq(z)
    mse = (vq.codes_from_indices(out.indices) - z).square().mean()
    assert torch.allclose(out.loss, 1.25 * mse)
    mask = torch.tensor([True, False, False, True])
    masked = vq(z, mask)
    expected = 1.25 * (vq.codes_from_indices(out.indices) - z)[mask].square().mean()
    assert torch.allclose(masked.loss, expected)
    none = vq(z, torch.zeros(4, dtype=torch.bool))
    assert none.loss.item() == 0.0


def test_usage_and_dead_codes():
    vq = VectorQuantizer(4, 2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = torch.tensor([[0.1, 0.0], [9.0, 0.5]]).T.reshape(1, 2, 1, 2)  # codes 0 and 1
    out = vq.train()(z)
    assert out.indices.flatten().tolist() == [0, 1]
    assert vq.usage.tolist() == [1.0, 1.0, 0.0, 0.0] and int(vq.dead_codes()) == 2
    assert torch.isclose(out.perplexity, torch.tensor(2.0))
    vq.eval()(z)
    assert vq.usage.sum() == 2  # no counting in eval
    vq.reset_usage()
    assert int(vq.dead_codes()) == 4


def test_perplexity_bounds():
    assert torch.isclose(perplexity_of(torch.zeros(10, dtype=torch.long), 8), torch.tensor(1.0))
    assert torch.isclose(perplexity_of(torch.arange(8), 8), torch.tensor(8.0))


def test_soft_codes_match_hard_for_one_hot():
    vq = VectorQuantizer(5, 3)
    idx = torch.randint(0, 5, (2, 3, 3))
    probs = torch.nn.functional.one_hot(idx, 5).float()
    assert torch.allclose(vq.codes_from_probs(probs), vq.codes_from_indices(idx))


def test_bad_input_errors():
    vq = VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match="expects"):
        vq(torch.randn(1, 2, 2, 2))
    with pytest.raises(TypeError, match="long"):
        vq.codes_from_indices(torch.zeros(1, 2, 2))


def test_dead_codes_restart_onto_live_samples():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4).train()
    z = torch.randn(2, 4, 4, 4) + 10.0  # far from the tiny initial codes: the codebook collapses
    first = vq(z)
    dead_before = int(vq.dead_codes())
    assert dead_before >= 12
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    moved = vq.restart_dead_codes_(flat)
    assert moved == dead_before and int(vq.usage.sum()) == 0
    on_sample = (vq.embedding.weight[:, None] - flat[None]).abs().amax(-1).min(dim=1).values < 1e-6
    assert int(on_sample.sum()) >= moved  # every moved code sits on a live sample
    second = vq(z)
    assert int(vq.dead_codes()) < dead_before and float(second.perplexity) > 3 * float(first.perplexity)
    with pytest.raises(ValueError, match="samples"):
        vq.restart_dead_codes_(torch.randn(3, 5))
