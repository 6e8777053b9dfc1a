"""Ensemble mechanics: scores, reward gradients, bf16, reliability mask, state dict, weight errors."""
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from qualiteacher.iqa import Ensemble, MissingWeightsError, build_ensemble
from qualiteacher.iqa.members import MemberSpec, Normalization
from qualiteacher.iqa.presets import TASKS, ensemble_from_specs




@pytest.fixture(scope="session")
def offline_dehaze(qt_home: Path) -> Ensemble:
    return build_ensemble("offline", task="dehaze")


@pytest.mark.parametrize("task", TASKS)
def test_offline_preset_scores_small_images(task: str, qt_home: Path) -> None:
    ens = build_ensemble("offline", task=task)
    x = torch.rand(3, 3, 32, 48)
    s = ens(x)
    assert set(s.raw) == set(s.normalized) == {spec.name for spec in ens.specs}
    for name in s.raw:
        assert s.raw[name].shape == (3,) and torch.isfinite(s.raw[name]).all(), name
        assert (0 <= s.normalized[name]).all() and (s.normalized[name] <= 1).all()
    assert s.fused.shape == (3,) and s.level.dtype == torch.long and s.level.shape == (3,)
    assert not s.fused.requires_grad
    assert torch.equal(s.level, ens.level_of(s.fused))


def test_reward_has_input_gradients_and_no_param_gradients(offline_dehaze: Ensemble) -> None:
    x = torch.rand(2, 3, 48, 64, requires_grad=True)
    r = offline_dehaze.reward(x)
    assert r.shape == (2,)
    assert torch.allclose(r.detach(), offline_dehaze(x.detach()).fused, atol=1e-5)  # piqe detached, not dropped
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in offline_dehaze.parameters())


def test_reward_modes_exclude_and_detach() -> None:
    specs = [
        MemberSpec("contrast", "physical:contrast", 1.0, Normalization("range", 0, 0.5), True, True),
        MemberSpec("haze", "physical:haze_density", 1.0, Normalization("range", 0, 1), False, True, "detach"),
        MemberSpec("exp", "physical:exposure", 2.0, Normalization("range", 0, 1), True, True, "exclude"),
    ]
    ens = ensemble_from_specs(specs)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    r = ens.reward(x)
    s = ens(x.detach())
    assert torch.allclose(r.detach(), (s.normalized["contrast"] + s.normalized["haze"]) / 2, atol=1e-6)
    (g_all,) = torch.autograd.grad(r.sum(), x)
    only_contrast = specs[:1]
    (g_c,) = torch.autograd.grad(ensemble_from_specs(only_contrast).reward(x).sum() / 2, x)
    assert torch.allclose(g_all, g_c, atol=1e-7)  # the detached member adds no gradient


def test_reward_under_bf16_autocast(offline_dehaze: Ensemble) -> None:
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(x, torch.eye(3)[:, :, None, None])  # a bf16 "student output"
        assert y.dtype == torch.bfloat16
        r = offline_dehaze.reward(y)
    assert r.dtype == torch.float32 and torch.isfinite(r).all()
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("size,block", [((64, 96), 32), ((50, 70), 32), ((20, 28), 144), ((144, 150), 144)])
def test_reliability_mask_shapes(size: tuple[int, int], block: int, qt_home: Path) -> None:
    ens = ensemble_from_specs([MemberSpec("c", "physical:contrast", 1.0, Normalization("range", 0, 0.3), True, True)])
    h, w = size
    x = torch.rand(2, 3, h, w)
    x[1, :, :, : w // 2] = 0.5  # flat left half of image 1: low contrast there
    mask = ens.reliability_mask(x, block=block)
    assert mask.shape == (2, 1, h, w) and torch.isfinite(mask).all()
    assert (mask >= 0).all() and (mask <= 1).all()
    if w >= 2 * block:
        assert mask[1, 0, :, :4].mean() < mask[1, 0, :, -4:].mean()


def test_reliability_mask_is_one_batched_call(offline_dehaze: Ensemble, monkeypatch) -> None:
    calls = []
    original = Ensemble.forward

    def counting(self, images):
        calls.append(images.shape)
        return original(self, images)

    monkeypatch.setattr(Ensemble, "forward", counting)
    mask = offline_dehaze.reliability_mask(torch.rand(2, 3, 70, 100), block=32)
    assert mask.shape == (2, 1, 70, 100)
    assert calls == [torch.Size([2 * 3 * 4, 3, 32, 32])]


def test_state_dict_moves_and_eval(offline_dehaze: Ensemble) -> None:
    class Parent(nn.Module):
        def __init__(self, iqa: Ensemble) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.iqa = iqa

    parent = Parent(offline_dehaze)
    assert set(parent.state_dict()) == {"lin.weight", "lin.bias"}  # IQA stays out of checkpoints
    parent.load_state_dict(parent.state_dict())  # strict load still works
    parent.train()
    assert parent.lin.training and not any(m.training for m in offline_dehaze.modules())
    fresh = build_ensemble("offline", task="dehaze")
    moved = fresh.to(torch.float16)  # Lightning-style .to() reaches the members' tensors
    assert moved is fresh and fresh.members["brisque"].sv.dtype == torch.float16


def test_quantile_level_option(offline_dehaze: Ensemble) -> None:
    pool = torch.linspace(0.3, 0.5, 80)
    thresholds = offline_dehaze.fit_levels_(pool)
    assert thresholds.shape == (7,)
    assert offline_dehaze.level_of(torch.tensor([0.3, 0.5])).tolist() == [0, 7]
    offline_dehaze.reset_levels_()
    assert offline_dehaze.level_of(torch.tensor([0.3, 0.5])).tolist() == [3, 5]


def test_bad_input_shape(offline_dehaze: Ensemble) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        offline_dehaze(torch.rand(3, 32, 32))


def test_paper_preset_offline_fails_fast_with_clear_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as info:
        build_ensemble("paper")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "musiq_koniq_ckpt-e95806b9.pth" in message
    assert str(tmp_path / "torch" / "hub" / "pyiqa") in message
    assert "offline" in message


def _pyiqa_brisque_spec(**kw) -> MemberSpec:
    return MemberSpec("brisque_pyiqa", "pyiqa:brisque", 1.0, Normalization("range", 0, 100), False, True, **kw)


def test_download_failure_becomes_missing_weights_error(tmp_path: Path, monkeypatch) -> None:
    import urllib.error

    import pyiqa.utils.download_util as du

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("QUALITEACHER_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(du, "download_url_to_file", no_network)
    # the host answers (as on a machine with network) but the download itself fails
    import qualiteacher.iqa.pyiqa_adapter as adapter

    monkeypatch.setattr(adapter, "host_reachable", lambda url: (True, ""))
    with pytest.raises(MissingWeightsError, match="brisque_svm_weights.pth") as info:
        ensemble_from_specs([_pyiqa_brisque_spec()])
    assert "URLError" in str(info.value)


def test_unreachable_host_becomes_missing_weights_error_without_a_download(tmp_path: Path, monkeypatch) -> None:
    import pyiqa.utils.download_util as du

    import qualiteacher.iqa.pyiqa_adapter as adapter

    def must_not_download(*args, **kwargs):
        raise AssertionError("no download may be tried when the host does not answer")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("QUALITEACHER_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(du, "download_url_to_file", must_not_download)
    monkeypatch.setattr(adapter, "host_reachable", lambda url: (False, "example.invalid is not reachable"))
    with pytest.raises(MissingWeightsError, match="not reachable"):
        ensemble_from_specs([_pyiqa_brisque_spec()])


def test_weights_dir_supplies_pyiqa_files(tmp_path: Path, monkeypatch) -> None:
    from qualiteacher.iqa.offline import convert_brisque_package_svr

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")
    params = torch.load(convert_brisque_package_svr(tmp_path / "svr.pth"), weights_only=True)
    torch.save((params["sv_coef"], params["sv"]), tmp_path / "brisque_svm_weights.pth")  # pyiqa's layout
    ens = ensemble_from_specs([_pyiqa_brisque_spec()], weights_dir=str(tmp_path))
    assert torch.isfinite(ens(torch.rand(2, 3, 40, 40)).raw["brisque_pyiqa"]).all()


def test_local_weights_path_is_used_and_checked(tmp_path: Path) -> None:
    spec = _pyiqa_brisque_spec(weights_path=str(tmp_path / "nope.pth"))
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        ensemble_from_specs([spec])


def test_with_reward_modes_detaches_a_member_from_the_gradient_only() -> None:
    import torch

    from qualiteacher.iqa.ensemble import with_reward_modes
    from qualiteacher.iqa.presets import build_ensemble

    full = build_ensemble("offline", task="dehaze")
    detached = with_reward_modes(full, {"colourfulness": "detach"})
    assert {s.name: s.reward_mode for s in detached.specs}["colourfulness"] == "detach"
    x = (0.5 + 0.05 * torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    r_full, r_det = full.reward(x), detached.reward(x)
    assert torch.allclose(r_full, r_det)  # same value
    g_full = torch.autograd.grad(r_full.sum(), x)[0]
    g_det = torch.autograd.grad(r_det.sum(), x)[0]
    assert (g_full - g_det).abs().max() > 1e-5  # colourfulness no longer pushes the pixels
    with pytest.raises(ValueError, match="nope"):
        with_reward_modes(full, {"nope": "detach"})
