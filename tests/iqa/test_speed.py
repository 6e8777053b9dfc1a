"""Stage-3 speed work: the float32 NIQE / BRISQUE paths agree with the references, level
subsampling keeps the all-pairs loss unbiased, the stage-3 benchmark runs (no timing asserted)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qualiteacher.iqa import fast_features as ff
from qualiteacher.iqa import offline
from qualiteacher.losses.preference import (
    all_pairs_preference_loss,
    draw_level_subsets,
    sampled_all_pairs_preference_loss,
)

# Stated tolerances (measured on these images: NIQE max 0.6 % relative, BRISQUE features 0.6 %,
# package-recipe BRISQUE 0.001 points). The float32 paths differ from the float64 references by
# rounding and by solving the AGGD shape exactly where pyiqa picks the nearest of a 0.001 grid.
NIQE_REL_TOL = 0.015
BRISQUE_PYIQA_ABS_TOL = 0.5     # points on BRISQUE's 0..100 scale, same SVR on both sides
BRISQUE_PACKAGE_ABS_TOL = 0.02  # points, against offline.BrisqueSVR's float64 recipe


def _photos(size: int) -> torch.Tensor:
    """Clean photo crops plus blurred and noisy copies: (12, 3, size, size) in [0, 1]."""
    from kornia.filters import gaussian_blur2d

    crops = []
    for p in offline.load_skimage_photos(("astronaut", "coffee", "chelsea", "rocket")):
        t = torch.from_numpy(p).permute(2, 0, 1)[None]
        crops.append(t[..., 40:40 + size, 50:50 + size])
    x = torch.cat(crops).float()
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.08 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return torch.cat([x, gaussian_blur2d(x, (9, 9), (1.5, 1.5)), noisy])


def test_matlab_half_matches_pyiqa_imresize():
    from pyiqa.matlab_utils import imresize

    for h, w in ((192, 192), (97, 102), (33, 48)):
        x = torch.rand(2, 1, h, w, dtype=torch.float64) * 255
        ref = imresize(x, scale=0.5, antialiasing=True)
        ours = ff.matlab_half(x)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < 1e-3


def test_fast_niqe_matches_pyiqa_and_the_member_switches_paths():
    from pyiqa.archs.niqe_arch import calculate_niqe

    from qualiteacher.iqa.pyiqa_adapter import build_pyiqa_member

    member = build_pyiqa_member("niqe", "niqe", str(offline.default_niqe_params()), allow_download=False)
    assert member.fast
    x = _photos(192)
    ref = calculate_niqe(x, 0, True, "yiq", member.net.mu_pris_param, member.net.cov_pris_param)  # float32 in, as the ensemble feeds it
    ours = member(x)
    np.testing.assert_allclose(ours.double().numpy(), ref.numpy(), rtol=NIQE_REL_TOL)
    member.fast = False  # the reference path stays available (the benchmark's re-enactment uses it)
    np.testing.assert_allclose(member(x[:2]).double().numpy(), ref[:2].numpy(), rtol=1e-6)
    assert ours[8:].mean() > ours[:4].mean()  # noise scores worse


def test_fast_niqe_gradient_is_finite_and_flat_images_give_nan_not_an_error():
    x = _photos(192)[:2].requires_grad_(True)
    s = ff.niqe_score(x, *_pristine())
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    flat = torch.full((1, 3, 192, 192), 0.5)
    assert torch.isnan(ff.niqe_score(flat, *_pristine())).all()


def _pristine() -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.io

    mat = scipy.io.loadmat(str(offline.default_niqe_params()))
    return torch.from_numpy(np.ravel(mat["mu_prisparam"])), torch.from_numpy(mat["cov_prisparam"])


def test_fast_brisque_matches_pyiqa_with_the_same_svr(tmp_path: Path):
    from qualiteacher.iqa.pyiqa_adapter import build_pyiqa_member

    # pyiqa's LIVE SVR file cannot be downloaded here: a made-up SVR of the same form (pyiqa's
    # file is a pickled (sv_coef, sv) pair) scores both paths; the features decide the agreement
    gen = torch.Generator().manual_seed(0)
    sv = torch.rand(60, 36, generator=gen, dtype=torch.float64) * 2 - 1
    coef = torch.randn(60, generator=gen, dtype=torch.float64) * 20
    path = tmp_path / "svr.pth"
    torch.save((coef, sv), path)
    member = build_pyiqa_member("brisque", "brisque", str(path), allow_download=False)
    assert member.fast
    x = _photos(72)
    ours = member(x)
    member.fast = False
    ref = member(x)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max() < BRISQUE_PYIQA_ABS_TOL, (ours - ref).abs().max()


def test_fast_brisque_package_recipe_matches_the_float64_member():
    member = offline.load_brisque_svr()
    x = _photos(72)[..., :65, :71]  # odd sizes
    ref = member(x.double())   # float64 input: the exact recipe
    ours = member(x)           # float32 input: the fast features
    assert ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max() < BRISQUE_PACKAGE_ABS_TOL


def test_level_subsets_are_distinct_sorted_and_keep_the_top():
    grid = torch.arange(8)
    lv = draw_level_subsets(64, grid, 3, keep=7, generator=torch.Generator().manual_seed(0))
    assert lv.shape == (64, 3) and (lv[:, -1] == 7).all()
    assert (lv[:, 1:] > lv[:, :-1]).all()
    assert len({tuple(r) for r in lv.tolist()}) > 10  # really drawn per image
    with pytest.raises(ValueError):
        draw_level_subsets(2, grid, 9)


@pytest.mark.parametrize("keep", [None, 7])
def test_level_subsampling_keeps_the_all_pairs_loss_unbiased(keep):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.tensor([[0.10, 0.30, 0.20, 0.50, 0.45, 0.60, 0.70, 0.90],
                            [0.90, 0.10, 0.40, 0.20, 0.60, 0.30, 0.50, 0.20]])
    grid = torch.arange(8)
    full = all_pairs_preference_loss(rewards, grid, beta=2.0, delta_per_level=0.05)
    draws = 4000
    est = torch.stack([
        sampled_all_pairs_preference_loss(torch.gather(rewards, 1, lv), lv, 8, keep, 2.0, 0.05)
        for lv in (draw_level_subsets(2, grid, 3, keep, gen) for _ in range(draws))])
    stderr = est.std() / math.sqrt(draws)
    assert abs(est.mean() - full) < 4 * stderr + 1e-4, (est.mean().item(), full.item(), stderr.item())
    # a single draw is not the full loss (it is an estimate), and the full set gives it exactly
    assert est.std() > 0
    exact = sampled_all_pairs_preference_loss(rewards, grid.expand(2, -1), 8, keep, 2.0, 0.05)
    assert torch.allclose(exact, full)


def test_benchmark_stage3_runs_on_tiny_sizes(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pipelines"))
    try:
        import benchmark_stage3
    finally:
        sys.path.pop(0)
    result = benchmark_stage3.main(["--preset", "demo", "--batch", "1", "--size", "32", "--steps", "1",
                                    "--warmup", "0", "--pref-levels", "3",
                                    "--override", "stage3.model.low_levels=[4,5,6]"])
    out = capsys.readouterr().out
    assert {"ours_s", "released_s", "speedup", "iqa_share", "device"} <= set(result)
    assert result["ours_s"] > 0 and result["released_s"] > 0 and 0 <= result["iqa_share"] <= 1
    assert '"speedup"' in out and "candidate grading" in out


def test_native_niqe_member_grades_small_crops_at_their_own_size():
    from qualiteacher.iqa.members import MemberSpec
    from qualiteacher.iqa.presets import build_member, preset_specs

    spec = next(s for s in preset_specs("offline") if s.name == "niqe")
    member = build_member(MemberSpec.from_dict({**spec.to_dict(), "options": {"native": True}}))
    assert member.min_size == 32  # 2 blocks of 16 px: a 32-px crop is not upsampled
    x = _photos(32)
    s = member(x)
    assert torch.isfinite(s).all()
    assert s[8:].mean() > s[:4].mean()  # noisy crops score worse than clean ones
    assert ff.native_block(32, 48) == 16 and ff.native_block(500, 700) == 96


def test_stage3_ranks_a_subset_of_levels(demo_root, fast_ensemble_factory):
    import lightning as L

    from qualiteacher.data.datamodule import RestorationDataModule
    from qualiteacher.training.stage3 import QualiTeacherModule

    with pytest.raises(ValueError, match="pref_levels_per_step"):
        QualiTeacherModule(preset="tiny", ensemble=fast_ensemble_factory(), pref_levels_per_step=2)
    module = QualiTeacherModule(preset="tiny", ensemble=fast_ensemble_factory(), pref_mode="all_pairs",
                                low_levels=(0, 1, 2, 3, 4, 5, 6), pref_levels_per_step=3, pref_start_step=0,
                                crop_start_step=0, mask_block=16, n_aug_variants=1, lr=1e-3)
    seen = []
    orig = module._reward
    module._reward = lambda images: seen.append(images.shape[0]) or orig(images)
    dm = RestorationDataModule(labeled_root=str(demo_root / "dehaze" / "labeled"),
                               unlabeled_root=str(demo_root / "dehaze" / "unlabeled"), crop_size=32, batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert 3 * 2 in seen  # 3 levels x 2 images rewarded per step, not 8 x 2
    assert 8 * 2 not in seen
