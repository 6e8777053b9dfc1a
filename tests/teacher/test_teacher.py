"""EMA, views, multi-augmentation and the pseudo-label bank on hand-made tensors."""
import pytest
import torch
from torch import nn

from qualiteacher.teacher import (AUGMENTATIONS, DiskStore, MemoryStore, PseudoLabelBank, VIEWS, apply_view,
                                  ema_update_, invert_view, make_teacher, merge_indexes, multi_augment)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_ema_decay_zero_copies_student_including_buffers():
    student, teacher = _net(), _net()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student[1].running_mean.fill_(3.0)
    student[1].num_batches_tracked.fill_(7)
    ema_update_(teacher, student, decay=0.0)
    for a, b in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_decay_one_changes_nothing_and_intermediate_is_lerp():
    student, teacher = _net(), _net()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, decay=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update_(teacher, student, decay=0.75)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * s)


def test_ema_rejects_bad_decay_and_mismatched_modules():
    with pytest.raises(ValueError, match="decay"):
        ema_update_(_net(), _net(), 1.5)
    with pytest.raises(ValueError, match="differ"):
        ema_update_(_net(), nn.Conv2d(3, 4, 3), 0.9)


def test_make_teacher_is_frozen_eval_copy():
    student = _net()
    teacher = make_teacher(student)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("view", VIEWS)
def test_view_inversion_is_exact(view):
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(invert_view(apply_view(x, view), view), x)
    if view != "identity":
        assert not torch.equal(apply_view(x, view), x)


def test_unknown_view_rejected():
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(torch.rand(1, 3, 4, 4), "rot45")


@pytest.mark.parametrize("kind", AUGMENTATIONS)
def test_multi_augment_degrades_each_kind(kind):
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    pl = torch.stack([torch.sin(6 * xx) * 0.4 + 0.5, yy, 0.5 + 0.3 * torch.cos(5 * yy)])[None].repeat(2, 1, 1, 1)
    lq = torch.full_like(pl, 0.8)
    var = multi_augment(pl, lq, n_variants=3, kinds=(kind,), generator=g)
    assert var.images.shape == (6, 3, 32, 32)
    assert var.source.tolist() == [0, 1, 0, 1, 0, 1]
    assert set(var.kind) == {kind}
    assert var.images.min() >= 0 and var.images.max() <= 1
    diff = (var.images - pl[var.source]).abs().mean(dim=(1, 2, 3))
    assert (diff > 1e-4).all()


def test_multi_augment_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown augmentation"):
        multi_augment(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), kinds=("sepia",))


def _img(v: float) -> torch.Tensor:
    return torch.full((3, 4, 4), v)


def _store(kind: str, tmp_path):
    return DiskStore(tmp_path / "bank", cache_entries=2) if kind == "disk" else MemoryStore()


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_bank_keeps_best_k_under_scripted_sequence(kind, tmp_path):
    bank = PseudoLabelBank(k=3, store=_store(kind, tmp_path))
    mask = torch.ones(1, 4, 4)
    script = [("a", 0.5, True), ("a", 0.2, True), ("a", 0.3, True),  # fills up
              ("a", 0.1, False),                                       # worse than worst: rejected
              ("a", 0.9, True),                                        # replaces 0.2
              ("a", 0.3, False),                                       # tie with worst: incumbent stays
              ("b", 0.05, True)]
    for image_id, score, expected in script:
        assert bank.offer(image_id, _img(score), mask, score, int(score * 10)) is expected
    assert [e.score for e in bank.entries["a"]] == [0.9, 0.5, 0.3]
    assert [e.level for e in bank.entries["a"]] == [9, 5, 3]
    assert len(bank) == 2 and "a" in bank and "zzz" not in bank
    imgs, masks, levels, scores, owner = bank.gather(["b", "a", "zzz"])
    assert imgs.shape == (4, 3, 4, 4) and masks.shape == (4, 1, 4, 4)
    assert owner.tolist() == [0, 1, 1, 1]
    assert scores.tolist() == pytest.approx([0.05, 0.9, 0.5, 0.3])
    assert levels.tolist() == [0, 9, 5, 3]
    # stored images are the offered ones (uint8 round trip)
    assert torch.allclose(imgs[1], _img(0.9), atol=1 / 255) and torch.allclose(imgs[3], _img(0.3), atol=1 / 255)
    assert bank.accepts(["a", "a", "c"], torch.tensor([0.31, 0.29, 0.0])).tolist() == [True, False, True]
    assert bank.level_counts(10) == [1, 0, 0, 1, 0, 1, 0, 0, 0, 1]
    assert bank.mean_score() == pytest.approx((0.9 + 0.5 + 0.3 + 0.05) / 4)
    assert bank.best_scores(["a", "zzz"], default=-1.0) == pytest.approx([0.9, -1.0])


def test_bank_skips_non_finite_scores_and_duplicate_content():
    bank = PseudoLabelBank(k=3)
    assert not bank.offer("a", _img(0.5), torch.ones(1, 4, 4), float("nan"), 0)
    assert "a" not in bank
    assert bank.offer("a", _img(0.5), torch.ones(1, 4, 4), 0.5, 5)
    assert not bank.offer("a", _img(0.5), torch.ones(1, 4, 4), 0.5, 5)   # the same pixels: one entry
    assert len(bank.entries["a"]) == 1


def test_bank_batch_offer_state_round_trip_and_index_merge():
    bank = PseudoLabelBank(k=2)
    n = 5
    ids = ["x", "x", "x", "y", "y"]
    scores = torch.tensor([0.1, 0.7, 0.4, 0.2, 0.3])
    assert bank.offer_batch(ids, torch.rand(n, 3, 4, 4), torch.ones(n, 1, 4, 4), scores, torch.arange(n)) == 5
    assert [e.score for e in bank.entries["x"]] == pytest.approx([0.7, 0.4])
    restored = PseudoLabelBank()
    restored.load_state_dict(bank.state_dict())
    assert restored.k == 2 and restored.entries == bank.entries
    assert torch.equal(restored.gather(["x", "y"]).images, bank.gather(["x", "y"]).images)
    other = PseudoLabelBank(k=2)
    other.offer("z", torch.rand(3, 4, 4), torch.ones(1, 4, 4), 0.5, 5)
    other.offer("x", torch.rand(3, 4, 4), torch.ones(1, 4, 4), 0.99, 7)
    merged = merge_indexes([bank.index_state(), other.index_state()], k=2)
    assert set(merged) == {"x", "y", "z"}
    assert [e[0] for e in merged["x"]] == pytest.approx([0.99, 0.7])
    assert merged["y"] == bank.index_state()["y"]


def test_legacy_checkpoint_bank_loads():
    legacy = {"k": 2, "entries": {"a": [{"image": torch.full((3, 4, 4), 200, dtype=torch.uint8),
                                         "mask": torch.full((1, 4, 4), 255, dtype=torch.uint8),
                                         "score": 0.6, "level": 6}]}}
    bank = PseudoLabelBank()
    bank.load_state_dict(legacy)
    got = bank.gather(["a"])
    assert bank.k == 2 and got.levels.tolist() == [6]
    assert torch.equal((got.images * 255).round().to(torch.uint8), legacy["entries"]["a"][0]["image"][None])
