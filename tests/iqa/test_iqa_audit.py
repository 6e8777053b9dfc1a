"""Ensemble audit: destruction transforms, pass fractions, the audit command, the reward guard."""
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from qualiteacher.iqa.audit import (
    FUSED,
    AuditImages,
    default_images,
    failing_pairs,
    folder_images,
    pair_rows,
    pass_fractions,
    square_crops,
)
from qualiteacher.iqa.destruction import DESTRUCTIONS, destroy, list_destructions
from qualiteacher.training.restore import restore
from qualiteacher.training.reward_guard import (
    CLEAN,
    COLOUR,
    PSNR,
    Probe,
    RewardGuard,
    colour_correlation,
    hacking_alarm,
    psnr,
)


def _images(b: int = 2, h: int = 40, w: int = 52) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.rand(b, 3, h // 4, w // 4, generator=g), size=(h, w),
                                             mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("kind", list_destructions())
def test_destruction_is_deterministic_keeps_size_and_changes_the_image(kind: str) -> None:
    x = _images()
    a, b = destroy(x, kind, seed=3), destroy(x.clone(), kind, seed=3)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().amax() > 0.05
    single = torch.cat([DESTRUCTIONS[kind](x[i : i + 1], 3) for i in range(2)])
    if kind not in ("noise_texture", "hue_rotation"):  # one noise draw / one angle per image of the batch
        assert torch.allclose(single, a, atol=1e-5)


@pytest.mark.parametrize("kind", ["colour_cast", "noise_texture", "hue_rotation", "tile_seams", "chroma_noise",
                                  "chroma_speckle", "codebook_mosaic"])
def test_random_destructions_follow_the_seed(kind: str) -> None:
    x = _images()
    assert not torch.equal(destroy(x, kind, seed=0), destroy(x, kind, seed=1))
    torch.manual_seed(123)  # the global RNG plays no part
    first = destroy(x, kind, seed=5)
    torch.manual_seed(456)
    assert torch.equal(first, destroy(x, kind, seed=5))


def test_destruction_examples() -> None:
    x = _images()
    grey = destroy(x, "greyout")
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert destroy(x, "posterize").unique().numel() <= 4
    flat = destroy(x, "constant")
    assert torch.allclose(flat, x.mean((2, 3), keepdim=True).expand_as(x))
    assert destroy(x, "heavy_blur").std() < x.std()
    half = destroy(x, "desaturate")
    luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    assert torch.allclose((half * luma).sum(1), (x * luma).sum(1), atol=1e-5)  # luma kept, chroma halved
    speckled = destroy(x, "chroma_speckle")
    assert 0.01 < ((speckled - x).abs().amax(1) > 0.05).float().mean() < 0.2  # a few pixels, strongly
    assert destroy(x, "crush_blacks").eq(0).float().mean() > 0.05 and destroy(x, "overexpose").eq(1).any()
    with pytest.raises(KeyError, match="unknown destruction"):
        destroy(x, "melt")


def test_pass_fractions_on_hand_made_scores() -> None:
    names = ["a", "b", "c", "d"]
    source = {"m": np.array([0.5, 0.5, 0.5, 0.5]), FUSED: np.array([0.6, 0.6, 0.6, np.nan])}
    blur = {"m": np.array([0.4, 0.6, 0.5, 0.1]), FUSED: np.array([0.5, 0.5, 0.7, 0.1])}
    noise = {"m": np.array([0.1, 0.1, np.nan, 0.9]), FUSED: np.array([0.59, 0.2, 0.3, 0.4])}
    keep = np.array([True, True, True, False])  # the transform left image d unchanged: no pair
    pairs = pd.concat([pair_rows("blur", names, source, blur), pair_rows("noise", names, source, noise, keep)])
    table = pass_fractions(pairs)
    assert list(table.columns) == ["m", FUSED] and list(table.index) == ["blur", "noise", "all"]
    # strictly below passes; equal, above and NaN on either side fail
    assert table.loc["blur", "m"] == pytest.approx(2 / 4)  # 0.4 < .5, 0.6 no, 0.5 = .5 no, 0.1 yes
    assert table.loc["blur", FUSED] == pytest.approx(2 / 4)  # .5 yes, .5 yes, .7 no, NaN source no
    assert table.loc["noise", "m"] == pytest.approx(2 / 3)
    assert table.loc["noise", FUSED] == pytest.approx(3 / 3)
    assert table.loc["all", FUSED] == pytest.approx(5 / 7)
    fails = failing_pairs(pairs)
    assert sorted(zip(fails["destruction"], fails["image"])) == [("blur", "c"), ("blur", "d")]
    assert fails.loc[fails["image"] == "c", "margin"].item() == pytest.approx(0.1)


def test_scoring_survives_an_ensemble_that_raises(fast_ensemble_factory, monkeypatch) -> None:
    from qualiteacher.iqa.audit import score_images

    ensemble = fast_ensemble_factory("dehaze")
    real = ensemble.forward

    def flaky(x: torch.Tensor):
        if (x.flatten(1).std(1) < 1e-3).any():
            raise RuntimeError("linalg.svd: non-finite")  # as pyiqa's NIQE on a flat image
        return real(x)

    monkeypatch.setattr(ensemble, "forward", flaky)
    x = _images(3, 32, 32)
    x[1] = 0.5
    got = score_images(ensemble, x)
    assert np.isnan(got.normalized[FUSED][1]) and np.isfinite(got.normalized[FUSED][[0, 2]]).all()
    assert got.errors[FUSED] == 1 and set(got.normalized) == {s.name for s in ensemble.specs} | {FUSED}


def test_default_images_never_use_the_niqe_fit_photos() -> None:
    images = default_images(32, photos=("chelsea",))
    assert images.images.shape == (4, 3, 32, 32) and images.names == [f"chelsea#{i}" for i in range(4)]
    with pytest.raises(ValueError, match="NIQE"):
        default_images(32, photos=("chelsea", "astronaut"))


def test_folder_images_skip_bad_files(tmp_path: Path) -> None:
    from qualiteacher.data.io import write_image

    write_image(tmp_path / "one.png", np.random.default_rng(0).random((50, 70, 3)).astype(np.float32))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    images = folder_images(tmp_path, 32)
    assert isinstance(images, AuditImages) and images.images.shape == (4, 3, 32, 32)
    assert all(n.startswith("one#") for n in images.names)
    crops = square_crops(np.zeros((20, 30, 3), np.uint8), 16)
    assert len(crops) == 4 and crops[0].shape == (16, 16, 3)
    with pytest.raises(NotADirectoryError):
        folder_images(tmp_path / "missing", 32)


def test_audit_command_runs_in_seconds_with_the_offline_preset(tmp_path: Path, capsys) -> None:
    from qualiteacher.cli import main
    from qualiteacher.data.io import write_image
    from qualiteacher.iqa.audit import bundled_photo

    photo = bundled_photo("chelsea")[::4, ::4].astype(np.float32) / 255  # 75 x 113
    write_image(tmp_path / "imgs" / "cat.png", photo)
    out = tmp_path / "report"
    assert main(["iqa", "audit", "--task", "dehaze", "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--size", "48"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text or "FAIL" in text
    for suffix in (".md", ".png", "_pass.csv", "_ladders.csv", "_pairs.csv", "_failures.csv"):
        assert (out / f"audit_offline_dehaze{suffix}").is_file()
    table = pd.read_csv(out / "audit_offline_dehaze_pass.csv", index_col=0)
    assert set(table.index) == {*list_destructions(), "untrained_student", "all"}
    assert table[FUSED].between(0, 1).all()
    ladders = pd.read_csv(out / "audit_offline_dehaze_ladders.csv")
    assert set(ladders["kind"]) == {"dehaze", "blur", "noise", "jpeg"}
    assert "MEANINGLESS" not in (out / "audit_offline_dehaze.md").read_text()
    assert main(["iqa", "audit", "--task", "dehaze", "--preset", "nope", "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------ reward guard
def _history(fused: list[float], witness: list[float]) -> list[Probe]:
    return [Probe(10 * i, f, {"piqe": w, PSNR: 20.0}) for i, (f, w) in enumerate(zip(fused, witness))]


def test_guard_alarm_on_rising_fused_and_falling_witness() -> None:
    hacked = _history([0.50, 0.55, 0.60, 0.66], [0.60, 0.55, 0.50, 0.40])
    message = hacking_alarm(hacked, patience=3)
    assert message and "piqe 0.600 -> 0.400" in message and "steps 0-30" in message
    assert "other witnesses over the same probes: psnr 20.000 -> 20.000" in message  # context to weigh it
    assert hacking_alarm(hacked[:3], patience=3) is None  # not yet N consecutive probes
    assert hacking_alarm(hacked, patience=4) is None


@pytest.mark.parametrize("fused,witness", [
    ([0.50, 0.55, 0.60, 0.66], [0.40, 0.45, 0.50, 0.55]),  # healthy: both rise
    ([0.50, 0.55, 0.60, 0.66], [0.60, 0.60, 0.60, 0.60]),  # witness flat
    ([0.50, 0.55, 0.54, 0.66], [0.60, 0.55, 0.50, 0.40]),  # fused did not rise every time
    ([0.50, 0.55, 0.60, 0.66], [0.60, 0.55, 0.56, 0.40]),  # the witness recovered once
    ([0.50, 0.55, 0.60, 0.66], [0.60, 0.55, math.nan, 0.40]),  # unscorable probe: no verdict
])
def test_guard_is_quiet_on_healthy_sequences(fused: list[float], witness: list[float]) -> None:
    assert hacking_alarm(_history(fused, witness), patience=3) is None


def test_colour_correlation_on_hand_made_images() -> None:
    x = _images(2, 32, 32)
    grey = destroy(x, "greyout")
    assert colour_correlation(x, x) == pytest.approx(1.0, abs=1e-5)
    assert colour_correlation(x, 0.5 * x + 0.2) == pytest.approx(1.0, abs=1e-4)  # scale and offset: same colours
    assert colour_correlation(grey, x) == 0.0  # no chroma at all counts 0
    assert colour_correlation(destroy(x, "hue_rotation"), x) < 0.5 < colour_correlation(destroy(x, "desaturate"), x)


def test_guard_alarms_when_colour_falls_while_fused_rises() -> None:
    history = [Probe(i, 0.5 + 0.01 * i, {PSNR: 20.0, COLOUR: 0.9 - 0.1 * i}) for i in range(4)]
    message = hacking_alarm(history, patience=3)
    assert message and "colour 0.900 -> 0.600" in message


def test_guard_watches_psnr_too() -> None:
    history = [Probe(i, 0.5 + 0.01 * i, {PSNR: 20.0 - i}) for i in range(5)]
    assert "psnr" in hacking_alarm(history, patience=4)


def test_reward_guard_callback_logs_and_warns_once(fast_ensemble_factory) -> None:
    from qualiteacher.training.students import build_student

    logged: list[tuple[dict, int]] = []
    student = build_student("unet", "tiny")
    module = SimpleNamespace(student=student, ensemble=fast_ensemble_factory("dehaze"), hparams={"top_level": 7})
    trainer = SimpleNamespace(global_step=0, global_rank=0, datamodule=None,
                              logger=SimpleNamespace(log_metrics=lambda m, step: logged.append((m, step))))
    x = _images(3, 32, 32)
    batch = {"unlabeled": {"lq": x}, "labeled": {"lq": x, "gt": x.flip(-1)}}
    guard = RewardGuard(every_n_steps=2, patience=2, n_unlabeled=2, n_pairs=2)
    for step in range(1, 5):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, module, None, batch, step)
    assert [s for _, s in logged] == [2, 4] and guard.probe["unlabeled"].shape[0] == 2
    metrics = logged[0][0]
    assert {"reward_guard/fused", "reward_guard/psnr", "reward_guard/piqe", "reward_guard/alarm",
            "reward_guard/colour", "reward_guard/colour_input", "reward_guard/psnr_clean"} <= set(metrics)
    assert math.isfinite(metrics["reward_guard/fused"]) and metrics["reward_guard/alarm"] == 0.0
    # do no harm: the student given the probe's ground truth, measured against it
    with torch.no_grad():
        back = restore(student, guard.probe["gt"], level=7)
    assert metrics["reward_guard/psnr_clean"] == pytest.approx(float(psnr(back, guard.probe["gt"])), abs=1e-4)
    history = [Probe(i, 0.5 + 0.01 * i, {CLEAN: 30.0 - i}) for i in range(4)]
    assert "psnr_clean" in hacking_alarm(history, patience=3)  # a reward that climbs as clean photos change

    # a scripted hacking run: the guard warns once, then keeps logging the alarm flag
    script = iter(_history([0.5, 0.6, 0.7, 0.8, 0.9], [0.6, 0.5, 0.4, 0.3, 0.2]))
    guard = RewardGuard(every_n_steps=1, patience=2)
    guard.probe = {}
    guard.measure = lambda pl_module, step: (next(script), {})
    with pytest.warns(UserWarning, match="REWARD HACKING") as record:
        for step in range(1, 6):
            trainer.global_step = step
            guard.on_train_batch_end(trainer, module, None, batch, step)
    assert len([r for r in record if "REWARD HACKING" in str(r.message)]) == 1
    assert logged[-1][0]["reward_guard/alarm"] == 1.0


def test_audit_with_a_checkpoint_pairs_each_photo_with_its_students_rework(tmp_path: Path, app_checkpoint,
                                                                           capsys) -> None:
    from qualiteacher.cli import main
    from qualiteacher.data.io import write_image
    from qualiteacher.iqa.audit import TRAINED, bundled_photo
    from qualiteacher.training.students import trained_student_outputs

    photo = bundled_photo("chelsea")[::4, ::4].astype(np.float32) / 255
    write_image(tmp_path / "imgs" / "cat.png", photo)
    out = tmp_path / "report"
    assert main(["iqa", "audit", "--task", "dehaze", "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--size", "48", "--checkpoint", str(app_checkpoint)]) == 0
    pairs = pd.read_csv(out / "audit_offline_dehaze_pairs.csv")
    mine = pairs[(pairs["destruction"] == TRAINED) & (pairs["scorer"] == FUSED)]
    assert len(mine) >= 1 and mine["destroyed"].between(0, 1).all()
    assert TRAINED in pd.read_csv(out / "audit_offline_dehaze_pass.csv", index_col=0).index
    # the pairs hold what the student returns for the photo, at its top level
    x = torch.rand(2, 3, 48, 48)
    y = trained_student_outputs(app_checkpoint)(x, 0)
    assert y.shape == x.shape and not torch.equal(y, x) and float(y.min()) >= 0 and float(y.max()) <= 1
    capsys.readouterr()
    assert main(["iqa", "audit", "--task", "dehaze", "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    assert "nope.ckpt" in capsys.readouterr().err


def test_over_dehaze_inverts_the_haze_model_on_a_clean_photo() -> None:
    from qualiteacher.classical.dark_channel import airlight_of

    x = _images()
    out = destroy(x, "over_dehaze")
    a = airlight_of(x)[:, :, None, None]
    assert torch.allclose(out, (a + (x - a) / 0.6).clamp(0, 1), atol=1e-6)
    assert out.std() > x.std()                                             # contrast stretched
    dark = x.mean(1, keepdim=True) < 0.3
    assert (out.mean(1, keepdim=True)[dark] < x.mean(1, keepdim=True)[dark]).float().mean() > 0.9  # shadows crushed
