"""Loss formulas on hand-computed tensors."""
import math

import pytest
import torch

from qualiteacher.losses.consistency import crop_consistency_loss, random_window
from qualiteacher.losses.preference import all_pairs_preference_loss, draw_low_levels, preference_loss
from qualiteacher.losses.pseudo import masked_l1, pseudo_label_loss


def _nls(z: float) -> float:
    return -math.log(1 / (1 + math.exp(-z)))


def test_preference_loss_value_matches_hand_computation():
    r_top, r_low, r_pl = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.7]), torch.tensor([0.7, 0.4])
    out = preference_loss(r_top, r_low, r_pl, beta=2.0, delta=0.1, lam=1.5, lam2=0.5)
    la = (_nls(2 * (0.8 - 0.6 - 0.1)) + _nls(2 * (0.5 - 0.7 - 0.1))) / 2
    lb = (_nls(2 * (0.8 - 0.7)) + _nls(2 * (0.5 - 0.4))) / 2
    assert out.l_a.item() == pytest.approx(la, rel=1e-5)
    assert out.l_b.item() == pytest.approx(lb, rel=1e-5)
    assert out.total.item() == pytest.approx(1.5 * (la + 0.5 * lb), rel=1e-5)


def test_raising_top_reward_lowers_the_loss_and_teacher_reward_gets_no_gradient():
    r_top = torch.tensor([0.5, 0.3], requires_grad=True)
    r_low = torch.tensor([0.4, 0.4], requires_grad=True)
    r_pl = torch.tensor([0.6, 0.2], requires_grad=True)
    preference_loss(r_top, r_low, r_pl).total.backward()
    assert (r_top.grad < 0).all()        # gradient descent raises r(S(x, 7))
    assert (r_low.grad > 0).all()        # and lowers the lower level's reward
    assert r_pl.grad is None             # teacher rewards are detached targets


def test_all_pairs_margin_grows_with_gap():
    levels = torch.tensor([4, 5, 7])
    ordered = torch.tensor([[0.4, 0.5, 0.7]])
    reversed_ = ordered.flip(1)
    assert all_pairs_preference_loss(ordered, levels) < all_pairs_preference_loss(reversed_, levels)
    r = torch.tensor([[0.5, 0.5, 0.5]])
    # equal rewards: each pair loses -log σ(-δ·gap): gaps 1, 3, 2
    expected = (_nls(-0.05) + _nls(-0.15) + _nls(-0.10)) / 3
    assert all_pairs_preference_loss(r, levels, delta_per_level=0.05).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        all_pairs_preference_loss(torch.rand(2, 3), torch.tensor([1, 2]))


def test_low_levels_drawn_from_choices():
    g = torch.Generator().manual_seed(0)
    q = draw_low_levels(200, (4, 5, 6), g)
    assert set(q.tolist()) == {4, 5, 6}


def test_consistency_zero_for_identical_and_positive_otherwise():
    r = torch.tensor([0.3, 0.9])
    assert crop_consistency_loss(r, r.clone()).item() == 0.0
    assert crop_consistency_loss(r, torch.tensor([0.5, 0.5])).item() == pytest.approx(0.3)


def test_random_window_half_of_each_side_and_multiple():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        w = random_window(64, 48, 0.5, multiple=8, generator=g)
        assert (w.height, w.width) == (32, 24)
        assert 0 <= w.top <= 32 and 0 <= w.left <= 24
    x = torch.rand(1, 3, 64, 48)
    assert w(x).shape == (1, 3, 32, 24)
    with pytest.raises(ValueError):
        random_window(8, 8, 0.0)


def test_pseudo_label_loss_respects_masks_and_owners():
    out = torch.zeros(3, 3, 2, 2)
    pl = torch.ones(3, 3, 2, 2)
    mask = torch.zeros(3, 1, 2, 2)
    mask[0, :, 0, 0] = 1.0      # one pixel of entry 0 counts
    mask[2] = 1.0               # all of entry 2 counts
    assert masked_l1(out, pl, mask).tolist() == pytest.approx([0.25, 0.0, 1.0])
    owner = torch.tensor([0, 0, 1])
    # image 0: 0.25 + 0 ; image 1: 1.0 ; mean over 2 images
    assert pseudo_label_loss(out, pl, mask, owner, batch=2).item() == pytest.approx(0.625)
    assert pseudo_label_loss(out[:0], pl[:0], mask[:0], owner[:0], batch=2).item() == 0.0
