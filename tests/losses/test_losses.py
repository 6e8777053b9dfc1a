"""Loss formulas on hand-computed tensors."""
import math

import pytest
import torch

from qualiteacher.losses.consistency import ConsistencySettings, crop_consistency_loss, crop_windows, random_window
from qualiteacher.losses.preference import (
    PreferenceSettings,
    all_pairs_preference_loss,
    draw_low_levels,
    draw_ranked_levels,
    preference_loss,
    preference_term,
    sampled_all_pairs_preference_loss,
)
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


def _pref(**kw) -> PreferenceSettings:
    args = dict(mode="pair", beta=2.0, delta=0.1, lam=1.5, lam2=0.5, low_levels=(4, 5, 6), top_level=7,
                levels_per_step=None, start_step=0)
    return PreferenceSettings(**{**args, **kw})


def test_preference_term_applies_lambda_once_in_every_mode():
    g = torch.Generator().manual_seed(0)
    r_pl = torch.tensor([0.7, 0.4])
    pair = _pref()
    ranked = draw_ranked_levels(pair, 2, g)
    assert ranked.top == 0 and ranked.levels.shape == (2, 2) and (ranked.levels[0] == 7).all()
    assert set(ranked.levels[1].tolist()) <= {4, 5, 6}
    rewards = torch.tensor([[0.8, 0.5], [0.6, 0.7]])                    # (m, B): top, then the lower level
    got = preference_term(pair, rewards, ranked.levels, r_pl)
    assert torch.equal(got.total, preference_loss(rewards[0], rewards[1], r_pl, 2.0, 0.1, 1.5, 0.5).total)
    with pytest.raises(ValueError, match="r_pl_best"):
        preference_term(pair, rewards, ranked.levels)
    # all pairs: λ times the all-pairs loss, the margin per level δ / (top - lowest)
    full = _pref(mode="all_pairs")
    ranked = draw_ranked_levels(full, 2, g)
    assert ranked.levels[:, 0].tolist() == [4, 5, 6, 7] and ranked.top == 3
    r = torch.rand(4, 2)
    got = preference_term(full, r, ranked.levels)
    assert got.total.item() == pytest.approx(1.5 * all_pairs_preference_loss(r.T, ranked.levels[:, 0], 2.0, 0.1 / 3).item())
    assert got.l_a.item() == 0.0 and got.l_b.item() == 0.0
    # a subset of the levels per image: λ times the unbiased estimate, the top level always in (last row)
    sub = _pref(mode="all_pairs", low_levels=(0, 1, 2, 3, 4, 5, 6), levels_per_step=3)
    ranked = draw_ranked_levels(sub, 2, g)
    assert ranked.levels.shape == (3, 2) and ranked.top == 2 and (ranked.levels[2] == 7).all()
    r = torch.rand(3, 2)
    expected = 1.5 * sampled_all_pairs_preference_loss(r.T, ranked.levels.T, 8, 7, 2.0, 0.1 / 7)
    assert torch.allclose(preference_term(sub, r, ranked.levels).total, expected)


def test_preference_and_consistency_settings_check_their_values():
    with pytest.raises(ValueError, match="low_levels"):
        _pref(low_levels=(4, 9))
    with pytest.raises(ValueError, match="pref_levels_per_step"):
        _pref(mode="all_pairs", levels_per_step=2)
    with pytest.raises(ValueError, match="pref_mode"):
        _pref(mode="triples")
    with pytest.raises(ValueError, match="crop_fraction"):
        ConsistencySettings(fraction=0.0, windows="aligned", start_step=0)
    g = torch.Generator().manual_seed(3)
    out, inp = crop_windows(ConsistencySettings(0.5, "aligned", 0), 64, 64, 8, g)
    assert out == inp and (out.height, out.width) == (32, 32)
    pairs = [crop_windows(ConsistencySettings(0.5, "independent", 0), 64, 64, 8, g) for _ in range(10)]
    assert any(a != b for a, b in pairs)  # drawn apart, as released
