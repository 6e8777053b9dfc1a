"""What the paper path needs (issue: the paper preset executed end to end): the random-IQA switch and
its labels, evaluation on the training device, ``iqa_weights_dir`` reaching every ensemble builder,
the consistency crop multiple from the student, ``L_b`` on the reward's scale, and the stage-1
perceptual loss with a clear message when its weights are missing."""
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

import qualiteacher.iqa.presets as iqa_presets
from qualiteacher.iqa import MissingWeightsError
from qualiteacher.iqa.ensemble import Ensemble, without_members
from qualiteacher.iqa.members import MemberSpec, Normalization
from qualiteacher.iqa.presets import (MEANINGLESS, build_ensemble, ensemble_from_specs, label_meaningless,
                                      preset_specs, random_iqa_enabled)
from qualiteacher.pipeline.stages.evaluate import training_device
from qualiteacher.training.stage3 import QualiTeacherModule


# ---------------------------------------------------------------------------- random-IQA switch
@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("no", False),
                                       ("1", True), ("true", True)])
def test_random_iqa_switch_is_off_unless_set(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("QUALITEACHER_RANDOM_IQA", raising=False)
    else:
        monkeypatch.setenv("QUALITEACHER_RANDOM_IQA", value)
    assert random_iqa_enabled() is on


def test_paper_preset_without_the_switch_still_needs_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")
    monkeypatch.setenv("QUALITEACHER_RANDOM_IQA", "0")
    with pytest.raises(MissingWeightsError, match="musiq"):
        build_ensemble("paper", task="dehaze")


@pytest.fixture(scope="module")
def stand_in_paper() -> Ensemble:
    return ensemble_from_specs(preset_specs("paper", "dehaze"), task="dehaze", random_weights=True)


def test_stand_in_paper_ensemble_is_labelled_meaningless(stand_in_paper, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no file is read: nothing in the caches
    ens = stand_in_paper
    assert ens.meaningless and ens.random_members == ("musiq", "clip", "brisque")
    real_version = Ensemble(ens.specs, dict(ens.members), task="dehaze").version
    assert ens.version == real_version + "-random"  # the score caches never mix the two
    x = torch.rand(1, 3, 32, 32, requires_grad=True)  # MUSIQ costs seconds per image on a CPU
    s = ens(x.detach())
    assert set(s.raw) == {"musiq", "clip", "brisque"} and torch.isfinite(s.fused).all()
    ens.reward(x).sum().backward()  # the paper's members pass gradients to the input
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    table = label_meaningless(pd.DataFrame({"fused": s.fused.numpy()}), ens)
    assert set(table["iqa_scores"]) == {MEANINGLESS}
    held_out = without_members(ens, ["clip"])
    assert held_out.meaningless and held_out.random_members == ("musiq", "brisque")


def test_stand_ins_are_seeded_and_leave_the_global_rng_alone():
    specs = [s for s in preset_specs("paper") if s.name == "musiq"]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = ensemble_from_specs(specs, random_weights=True)
    assert torch.equal(torch.rand(3), expected_next)
    b = ensemble_from_specs(specs, random_weights=True)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(a(x).raw["musiq"], b(x).raw["musiq"])


def test_real_ensembles_are_not_labelled(fast_ensemble_factory, capsys):
    ens = fast_ensemble_factory()
    assert not ens.meaningless and not ens.version.endswith("-random")
    table = pd.DataFrame({"fused": [0.5]})
    assert list(label_meaningless(table, ens).columns) == ["fused"]
    assert "stand-in" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- eval device
@pytest.mark.parametrize("trainer, cuda, expected", [
    ({}, False, "cpu"),
    ({"accelerator": "cpu"}, True, "cpu"),
    ({}, True, "cuda:0"),
    ({"accelerator": "auto", "devices": 4}, True, "cuda:0"),
    ({"accelerator": "gpu", "devices": [2, 3]}, True, "cuda:2"),
    ({"accelerator": "cuda", "devices": "1,3"}, True, "cuda:1"),
])
def test_training_device_follows_the_trainer_section(monkeypatch, trainer, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert training_device(trainer) == torch.device(expected)


class _Client:
    """Records what the pipeline logs (an MLflow client stand-in)."""

    def __init__(self) -> None:
        self.tags: dict[tuple[str, str], str] = {}

    def log_artifact(self, *args, **kwargs):
        pass

    def log_batch(self, *args, **kwargs):
        pass

    def log_metric(self, *args, **kwargs):
        pass

    def set_tag(self, run_id, key, value):
        self.tags[(run_id, key)] = value


def _runs() -> SimpleNamespace:
    return SimpleNamespace(client=_Client(), parent_id="parent", uri="memory")


def _stage3_checkpoint(out: Path, **hparams) -> Path:
    module = QualiTeacherModule(preset="tiny", ensemble=nn.Identity(), **hparams)
    path = out / "stage3" / "final.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pseudo_label_bank": module.bank.state_dict()}, path)
    return path


@pytest.fixture
def recorded_builds(monkeypatch, fast_ensemble_factory):
    """``build_ensemble`` replaced by a recorder of its ``weights_dir`` (returns a fast ensemble)."""
    calls: list[str | None] = []

    def build(preset, task=None, weights_dir=None):
        calls.append(weights_dir)
        return fast_ensemble_factory(task or "dehaze")

    monkeypatch.setattr(iqa_presets, "build_ensemble", build)
    return calls


def test_eval_stage_restores_and_scores_on_the_training_device(demo_root, tmp_path, monkeypatch,
                                                              recorded_builds):
    import qualiteacher.eval.report as report
    import qualiteacher.pipeline.stages.evaluate as pipeline_eval

    _stage3_checkpoint(tmp_path / "out", iqa_weights_dir=str(tmp_path / "weights"))
    seen: dict[str, object] = {}
    real_device, real_eval = pipeline_eval.training_device, report.evaluate_restorers

    def device_of(trainer):
        seen["trainer"] = trainer
        return real_device(trainer)

    def evaluate(restorers, test, ensemble, device="cpu", **kw):
        seen["device"] = torch.device(device)
        return real_eval(restorers, test, ensemble, device=device, **kw)

    monkeypatch.setattr(pipeline_eval, "training_device", device_of)
    monkeypatch.setattr(report, "evaluate_restorers", evaluate)
    from qualiteacher.pipeline.resolve import resolve_config
    from qualiteacher.pipeline.sections import plan_stage

    cfg = resolve_config("dehaze", "tiny", overrides=[
        f"--out_dir={tmp_path / 'out'}", f"--data_root={demo_root}", "--eval.max_images=1",
        "--eval.levels=[0, 7]", "--eval.grid_levels=[7]", "--stage3.trainer.accelerator=cpu"])
    table = pipeline_eval.evaluate_pipeline(cfg.task, cfg.eval, plan_stage(cfg, "stage3"), cfg.task_data / "test",
                                            cfg.out / "eval", _runs(), "eval-run")
    assert seen["trainer"] == cfg.stage3["trainer"] and seen["trainer"]["accelerator"] == "cpu"
    assert seen["device"] == torch.device("cpu")
    assert "student@7" in table.index
    assert recorded_builds == [str(tmp_path / "weights")]  # the eval ensemble gets the weights folder


# ---------------------------------------------------------------------------- iqa_weights_dir
def test_weights_dir_reaches_every_ensemble_builder(demo_root, tmp_path, recorded_builds):
    from qualiteacher.iqa.cache import grade_clean_images, score_command
    from qualiteacher.pipeline.config import DemoSettings
    from qualiteacher.pipeline.stages.data import QualityGrading, prepare_data

    weights = str(tmp_path / "weights")
    gt = demo_root / "dehaze" / "labeled" / "gt"
    grade_clean_images(gt, "dehaze", "offline", tmp_path / "c1.parquet", weights_dir=weights)
    score_command(gt, "offline", "dehaze", cache=tmp_path / "c2.parquet", weights_dir=weights)
    grading = QualityGrading(table=tmp_path / "o" / "labeled_quality.csv", iqa_preset="offline",
                             weights_dir=weights, cache=tmp_path / "o" / "iqa_cache.parquet")
    prepare_data(demo_root, "dehaze", DemoSettings(), grading, _runs(), "data-run")
    assert (tmp_path / "o" / "labeled_quality.csv").is_file()
    QualiTeacherModule(preset="tiny", iqa_weights_dir=weights).setup("fit")
    assert recorded_builds == [weights] * 4
    # the command line: `score --weights-dir`, and `evaluate` with the checkpoint's own folder
    from qualiteacher.cli import main

    assert main(["score", str(gt), "--preset", "offline", "--task", "dehaze", "--cache", str(tmp_path / "c3.parquet"),
                 "--weights-dir", weights]) == 0
    ckpt = _stage3_checkpoint(tmp_path / "run", iqa_weights_dir=weights)
    assert main(["evaluate", "--task", "dehaze", "--data", str(demo_root), "--checkpoint", str(ckpt), "--limit", "1",
                 "--metrics", "piqe", "--out", str(tmp_path / "ev"), "--no-progress", "--device", "cpu"]) == 0
    assert recorded_builds == [weights] * 6


# ---------------------------------------------------------------------------- crop multiple
class _ShapeRecorder(nn.Module):
    """An ensemble stand-in whose reward records the sizes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def reward(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        return images.mean((1, 2, 3))


@pytest.mark.parametrize("student, preset, side, crop", [
    ("iqpir", "paper-smoke", 96, 32),   # IQPIR's multiple is 32: 48 rounds down to 32 (was 48 with 8)
    ("unet", "tiny", 84, 42),           # the tiny U-Net's multiple is 2: 42 stays 42 (was 40 with 8)
])
def test_consistency_crop_is_a_multiple_of_the_students_size_multiple(student, preset, side, crop):
    recorder = _ShapeRecorder()
    module = QualiTeacherModule(student=student, preset=preset, ensemble=recorder)
    assert module.student.size_multiple == module.student.downscale
    module._crop_consistency(torch.rand(2, 3, side, side), None)
    assert recorder.sizes == [(crop, crop), (crop, crop)]


# ---------------------------------------------------------------------------- L_b on one scale
class _Mean(nn.Module):
    def forward(self, images):
        return 0.5 * images.mean((1, 2, 3))  # in [0, 0.5]


class _One(nn.Module):
    def forward(self, images):
        return images.new_ones(images.shape[0])


def _excluding_ensemble() -> Ensemble:
    norm = Normalization("range", 0.0, 1.0)
    specs = [MemberSpec("mean", "physical:contrast", 1.0, norm, True, True, "grad"),
             MemberSpec("one", "physical:exposure", 9.0, norm, True, False, "exclude")]
    return Ensemble(specs, {"mean": _Mean(), "one": _One()}).requires_grad_(False).eval()


def test_best_pl_reward_is_on_the_reward_scale():
    ens = _excluding_ensemble()
    pls = torch.rand(5, 3, 16, 16)
    owner = torch.tensor([0, 0, 1, 1, 1])
    fused = ens(pls).fused                       # >= 0.9: the excluded member dominates
    module = QualiTeacherModule(preset="tiny", ensemble=ens)
    got = module._best_pl_reward(pls, fused, owner, 2)
    r = ens.reward(pls)                          # <= 0.5: the reward leaves it out
    assert torch.allclose(got, torch.stack([r[:2].max(), r[2:].max()]))
    assert (got < 0.5).all() and (fused > 0.9).all()
    same_scale = QualiTeacherModule(preset="tiny", ensemble=_excluding_ensemble_without_exclude())
    assert torch.equal(same_scale._best_pl_reward(pls, fused, owner, 2),
                       torch.stack([fused[:2].max(), fused[2:].max()]))  # no member excluded: the bank's scores


def _excluding_ensemble_without_exclude() -> Ensemble:
    norm = Normalization("range", 0.0, 1.0)
    specs = [MemberSpec("mean", "physical:contrast", 1.0, norm, True, True, "grad"),
             MemberSpec("one", "physical:exposure", 9.0, norm, True, False, "detach")]
    return Ensemble(specs, {"mean": _Mean(), "one": _One()}).requires_grad_(False).eval()


def test_training_step_compares_rewards_with_rewards(demo_root, monkeypatch):
    import lightning as L

    import qualiteacher.losses.preference as preference
    from qualiteacher.data.datamodule import RestorationDataModule

    seen = []
    real = preference.preference_loss

    def spy(r_top, r_low, r_pl_best, *args):
        seen.append((r_top.detach(), r_pl_best.detach()))
        return real(r_top, r_low, r_pl_best, *args)

    monkeypatch.setattr(preference, "preference_loss", spy)
    module = QualiTeacherModule(preset="tiny", ensemble=_excluding_ensemble(), pref_mode="pair",
                                pref_start_step=0, crop_start_step=0, views=("identity",), n_aug_variants=1,
                                mask_block=16)
    dm = RestorationDataModule(labeled_root=str(demo_root / "dehaze" / "labeled"),
                               unlabeled_root=str(demo_root / "dehaze" / "unlabeled"), crop_size=32, batch_size=2)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=dm)
    assert len(seen) == 2
    for r_top, r_pl_best in seen:  # both sides in [0, 0.5]; the bank's fused scores are >= 0.9
        assert (r_top <= 0.5).all() and (r_pl_best <= 0.5).all() and (r_pl_best > 0).all()


# ---------------------------------------------------------------------------- stage-1 perceptual loss
def test_perceptual_loss_offline_names_the_file_without_trying_the_network(tmp_path, monkeypatch):
    import torchvision

    from qualiteacher.losses.perceptual import VGGPerceptualLoss

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was tried although downloads are disabled")

    monkeypatch.setattr(torchvision.models.VGG16_Weights, "get_state_dict", no_network)
    with pytest.raises(FileNotFoundError) as info:
        VGGPerceptualLoss()
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "downloads are disabled" in message and "perceptual_weights" in message


def test_paper_preset_turns_the_stage1_perceptual_loss_on_and_trains_stage3_on_the_released_crop():
    from qualiteacher.pipeline.resolve import resolve_config

    cfg = resolve_config("dehaze", "paper")
    assert cfg.stage1["model"]["w_perceptual"] > 0
    assert cfg.stage3["data"]["crop_size"] == 288 and cfg.stage1["data"]["crop_size"] == 512
    text = (Path(__file__).resolve().parents[2] / "configs" / "presets" / "paper.yaml").read_text()
    assert "288" in text.split("demo:")[0]  # the preset says which crop it trains on, and why


def test_pipeline_without_the_vgg_file_is_one_clear_error(demo_root, tmp_path, monkeypatch, capsys):
    from qualiteacher.pipeline.cli import run_pipeline_cli

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    code = run_pipeline_cli("dehaze", ["--preset", "tiny", f"--data_root={demo_root}", f"--out_dir={tmp_path / 'o'}",
                                       "--only-stage", "stage1", "--stage1.model.w_perceptual=1",
                                       "--stage1.data.quality_table=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and "vgg16-397923af.pth" in err[-1] and str(tmp_path / "torch") in err[-1]
