import pytest
import torch

from qualiteacher.archs.codebooks import DualCodebook, DualQuantized, hq_mask_from_quality


def _book(fusion="add"):
    torch.manual_seed(0)
    book = DualCodebook(16, 16, 4, fusion=fusion)
    torch.nn.init.normal_(book.common.embedding.weight)
    torch.nn.init.normal_(book.hq.embedding.weight, std=0.3)
    return book


def test_mask_rule():
    q = torch.tensor([0.9, 0.7, 0.69, float("nan")])
    assert hq_mask_from_quality(q, 4, 0.7, q.device).tolist() == [True, True, False, False]
    assert hq_mask_from_quality(None, 3, 0.7, q.device).all()
    with pytest.raises(ValueError, match="shape"):
        hq_mask_from_quality(q, 3, 0.7, q.device)


@pytest.mark.parametrize("fusion", ["add", "attn"])
def test_hq_gate(fusion):
    book = _book(fusion)
    z = torch.randn(4, 4, 3, 3, requires_grad=True)
    quality = torch.tensor([0.95, 0.2, float("nan"), 0.8])
    out = book.train()(z, quality)
    assert isinstance(out, DualQuantized)
    low = torch.tensor([False, True, True, False])
    assert out.hq_mask.tolist() == [True, False, False, True]
    # below threshold: no HQ contribution, fused latent = common code
    assert torch.equal(out.z_hq[low], torch.zeros_like(out.z_hq[low]))
    assert torch.allclose(out.z[low], out.z_common[low])
    assert not torch.allclose(out.z[~low], out.z_common[~low])
    # no HQ codebook loss from low samples: the HQ loss equals the loss of the high samples alone
    high_only = book(z[~low].detach(), quality[~low])
    assert torch.allclose(out.loss_hq, high_only.loss_hq, atol=1e-6)
    # and no gradient from them into the HQ codebook
    all_low = book(z.detach(), torch.full((4,), 0.1))
    assert all_low.loss_hq.item() == 0.0
    book.zero_grad()
    all_low.loss.backward()
    assert book.hq.embedding.weight.grad is None or book.hq.embedding.weight.grad.abs().sum() == 0
    assert book.common.embedding.weight.grad.abs().sum() > 0


def test_hq_usage_counts_only_hq_samples():
    book = _book()
    book.train()(torch.randn(3, 4, 2, 2), torch.tensor([0.1, 0.1, 0.1]))
    assert book.hq.usage.sum() == 0 and book.common.usage.sum() == 12
    book(torch.randn(3, 4, 2, 2), torch.tensor([0.1, 0.9, 0.1]))
    assert book.hq.usage.sum() == 4


def test_residual_sum_approximates_latent_and_lookup():
    book = _book()
    z = torch.randn(2, 4, 3, 3)
    out = book(z, None)
    err_common = (out.z_common - z).square().mean()
    err_fused = (out.z - z).square().mean()
    assert err_fused < err_common  # the HQ codes refine the common approximation
    assert torch.allclose(book.codes_from_indices(out.indices_common, out.indices_hq), out.z, atol=1e-6)


def test_bad_fusion():
    with pytest.raises(ValueError, match="fusion"):
        DualCodebook(4, 4, 2, fusion="concat")
