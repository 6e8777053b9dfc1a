"""Training modes of stage 3 (baselines and ablations) and `qualiteacher study` (tiny preset, 32 px)."""
import json
import math
from collections.abc import Mapping

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.study.modes import GROUPS, MODES, is_conditioned, list_modes, mode_overrides, resolve_modes
from qualiteacher.training.stage3 import QualiTeacherModule

TOP = 7


def _module(ensemble, **kw):
    args = dict(preset="tiny", ensemble=ensemble, pref_start_step=0, crop_start_step=0, mask_block=16,
                views=("identity", "hflip"), n_aug_variants=1, ema_decay=0.9, lr=1e-3)
    args.update(kw)
    return QualiTeacherModule(**args)


def _fit(module, demo_root, steps=2, unlabeled=True):
    dm = RestorationDataModule(labeled_root=str(demo_root / "dehaze" / "labeled"),
                               unlabeled_root=str(demo_root / "dehaze" / "unlabeled") if unlabeled else None,
                               crop_size=32, batch_size=2)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return trainer


def _record_levels(net):
    """Wrap ``net.forward``: every call's level (None or a tensor) is appended to the list returned."""
    seen = []
    forward = net.forward

    def spy(x, level=None, *args, **kwargs):
        seen.append(None if level is None else level.detach().clone())
        return forward(x, level, *args, **kwargs)

    net.forward = spy
    return seen


# ------------------------------------------------------------------------------ the modes
@pytest.mark.parametrize("name", list_modes())
def test_every_mode_trains_two_steps(name, demo_root, fast_ensemble_factory):
    module = _module(fast_ensemble_factory(), **mode_overrides(name))
    before = [p.detach().clone() for p in module.student.parameters() if p.requires_grad]
    trainer = _fit(module, demo_root)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["stage3/total"])) and float(metrics["stage3/sup"]) > 0
    trained = [p for p in module.student.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, trained)), "the student did not move"
    if MODES[name]["mode"] == "supervised":  # supervised, and the oracle (supervised on other pairs)
        assert len(module.bank) == 0
        return
    assert len(module.bank) > 0 and float(metrics["stage3/pl"]) > 0
    uses_pref = name not in ("mean_teacher", "qualiteacher-preference")
    uses_crop = name not in ("mean_teacher", "qualiteacher-consistency")
    assert (float(metrics["stage3/pref"]) != 0) == uses_pref, "preference term"
    assert (float(metrics["stage3/crop"]) != 0) == uses_crop, "crop term"


def test_supervised_never_touches_unlabeled_data(demo_root):
    class Poison(nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the supervised baseline used the IQA ensemble")

        reward = level_of = reliability_mask = fit_levels_ = forward

    class PoisonBatch(Mapping):
        def __getitem__(self, key):
            raise AssertionError(f"the supervised baseline read the unlabeled batch ({key!r})")

        def __iter__(self):
            raise AssertionError("the supervised baseline iterated the unlabeled batch")

        def __len__(self):
            raise AssertionError("the supervised baseline sized the unlabeled batch")

    module = _module(Poison(), **mode_overrides("supervised"))
    step = module.training_step
    # the data module serves unlabeled batches; the module gets a poisoned one instead
    module.training_step = lambda batch, batch_idx: step({"labeled": batch["labeled"], "unlabeled": PoisonBatch()}, batch_idx)
    teacher_calls = _record_levels(module.teacher)
    trainer = _fit(module, demo_root)
    assert trainer.global_step == 2 and teacher_calls == [] and len(module.bank) == 0
    # without an ensemble given, none is built either
    bare = _module(None, **mode_overrides("supervised"))
    bare.setup("fit")
    assert bare.ensemble is None


def test_mean_teacher_never_calls_the_student_with_a_level(demo_root, fast_ensemble_factory):
    module = _module(fast_ensemble_factory(), **mode_overrides("mean_teacher"))
    levels = _record_levels(module.student)
    _fit(module, demo_root)
    assert levels and all(lv is None for lv in levels)
    assert len(module.bank) > 0  # it does learn from the bank's pseudo-labels
    # the recorder does see levels when the method uses them
    full = _module(fast_ensemble_factory(), **mode_overrides("qualiteacher"))
    seen = _record_levels(full.student)
    _fit(full, demo_root)
    assert any(lv is not None for lv in seen)


def test_conditioning_ablation_asks_only_for_the_top_level(demo_root, fast_ensemble_factory):
    module = _module(fast_ensemble_factory(), **mode_overrides("qualiteacher-conditioning"))
    levels = _record_levels(module.student)
    _fit(module, demo_root)
    conditioned = [lv for lv in levels if lv is not None]
    assert conditioned and all(bool((lv == TOP).all()) for lv in conditioned)


def test_mask_and_multiaug_ablations(demo_root, fast_ensemble_factory, monkeypatch):
    import qualiteacher.training.stage3_grading as stage3_grading

    module = _module(fast_ensemble_factory(), **mode_overrides("qualiteacher-mask"))
    _fit(module, demo_root)
    masks = module.bank.gather(list(module.bank.entries))[1]
    assert masks.numel() and bool((masks == 1).all())
    calls = []
    monkeypatch.setattr(stage3_grading, "multi_augment", lambda *a, **k: calls.append(1) or pytest.fail("multi-aug ran"))
    _fit(_module(fast_ensemble_factory(), **mode_overrides("qualiteacher-multiaug")), demo_root)
    # the plain Mean Teacher has no multi-augmentation whatever n_aug_variants says
    _fit(_module(fast_ensemble_factory(), **{**mode_overrides("mean_teacher"), "n_aug_variants": 2}), demo_root)
    assert calls == []


def test_held_out_member_is_never_used_in_training(demo_root, fast_ensemble_factory):
    from qualiteacher.iqa.ensemble import without_members

    full = fast_ensemble_factory()
    assert "piqe" in full.members  # the fast ensemble is the offline one without NIQE
    module = _module(full, iqa_exclude=("piqe",))
    full.members["piqe"].forward = lambda *a, **k: pytest.fail("the held-out member graded a training image")
    _fit(module, demo_root)
    assert "piqe" not in [s.name for s in module.ensemble.specs] and len(module.bank) > 0
    with pytest.raises(ValueError, match="cannot leave out"):
        without_members(fast_ensemble_factory(), ["no_such_member"])


def test_catalogue_groups_and_lookup():
    assert resolve_modes(["headline"]) == ["supervised", "mean_teacher", "qualiteacher"]
    assert resolve_modes(["qualiteacher", "all"]) == ["qualiteacher"] + [m for m in MODES if m != "qualiteacher"]
    assert set(GROUPS["ablations"]) == {f"qualiteacher-{p}" for p in
                                        ("preference", "consistency", "multiaug", "mask", "conditioning")}
    with pytest.raises(KeyError, match="unknown training mode"):
        resolve_modes(["qualiteacher-everything"])
    conditioned = {m for m in MODES if is_conditioned(mode_overrides(m))}
    assert conditioned == set(MODES) - {"supervised", "mean_teacher", "oracle", "qualiteacher-conditioning"}


# ------------------------------------------------------------------------------ the study
def test_every_mode_config_validates_and_supervised_gets_no_unlabeled_root(tmp_path, demo_root):
    from qualiteacher.pipeline.api import plan_run
    from qualiteacher.study.runner import StudySettings, run_config, seed_config
    from qualiteacher.study.store import RunKey, StudyStore

    store = StudyStore(tmp_path / "study")
    cfg = seed_config(StudySettings(preset="tiny", data_root=str(demo_root)), store, seed=3)
    assert cfg.stage3["model"]["seed"] == 3 and cfg.stage2["data"]["seed"] == 3
    for mode in MODES:
        rcfg = run_config(cfg, store, RunKey(mode, 3), steps=2, held_out="piqe")
        ns = plan_run(rcfg, ["stage3"], hardware=False).stage("stage3").args
        assert ns.model.mode == MODES[mode]["mode"] and list(ns.model.iqa_exclude) == ["piqe"]
        assert str(store.warmup_dir(3)) in ns.model.init_from  # every mode starts from the shared warm-up
        assert ns.trainer.max_steps == 2
        assert (ns.data.unlabeled_root is None) == (mode in ("supervised", "oracle"))
        # the unlabeled photos' ground truth is the oracle's alone
        assert ("oracle" in str(ns.data.labeled_root)) == (mode == "oracle")
        oracle_root = str(demo_root / "oracle")  # no other section (warm-up, eval) reads the oracle's pairs
        plain = rcfg.to_dict()
        assert oracle_root not in json.dumps({k: v for k, v in plain.items() if k != "stage3"}, default=str)
        assert (oracle_root in json.dumps(plain["stage3"], default=str)) == (mode == "oracle")


def test_summary_is_mean_and_std_over_seeds():
    from qualiteacher.study.report import summarize, summary_markdown

    runs = pd.DataFrame([
        {"restorer": "input", "seed": 0, "psnr": 10.0, "ssim": 0.5, "heldout": 0.5, "norm_piqe": 0.5, "norm_a": 0.1},
        {"restorer": "input", "seed": 1, "psnr": 10.0, "ssim": 0.5, "heldout": 0.5, "norm_piqe": 0.5, "norm_a": 0.1},
        {"restorer": "supervised", "seed": 0, "psnr": 12.0, "ssim": 0.6, "heldout": 0.4, "norm_piqe": 0.4, "norm_a": 0.2},
        {"restorer": "supervised", "seed": 1, "psnr": 14.0, "ssim": 0.7, "heldout": 0.6, "norm_piqe": 0.6, "norm_a": 0.3},
        {"restorer": "qualiteacher", "seed": 0, "psnr": 15.0, "ssim": 0.6, "heldout": 0.7, "norm_piqe": 0.7, "norm_a": 0.2},
        {"restorer": "qualiteacher", "seed": 1, "psnr": 15.0, "ssim": 0.6, "heldout": 0.7, "norm_piqe": 0.7, "norm_a": 0.2},
    ])
    summary = summarize(runs, ["input", "supervised", "qualiteacher"], held_out="piqe")
    assert list(summary.index) == ["input", "supervised", "qualiteacher"]
    assert summary.loc["supervised", "psnr_mean"] == 13.0
    assert summary.loc["supervised", "psnr_std"] == pytest.approx(2 ** 0.5)
    assert "norm_piqe_mean" not in summary.columns and "norm_a_mean" in summary.columns
    text = summary_markdown(summary, "piqe")
    assert "| supervised | 2 | 13.00 ± 1.41 |" in text and "**15.00 ± 0.00**" in text
    assert "held-out piqe" in text and "**10.00" not in text  # the input is a reference, never bold


def test_study_runs_tables_nests_mlflow_runs_and_resumes(demo_root, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    import qualiteacher.study.runner as runner
    import qualiteacher.study.warmup as warmup
    from qualiteacher.iqa.presets import preset_specs
    from qualiteacher.study.runner import StudySettings, run_study
    from qualiteacher.study.store import StudyMismatch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    s = StudySettings(task="dehaze", preset="tiny", seeds=(0,), modes=("supervised", "mean_teacher", "qualiteacher"),
                      steps=2, out=str(tmp_path / "study"), data_root=str(demo_root))
    result = run_study(s)
    runs = result.runs.set_index("restorer")
    assert list(runs.index) == ["input", "classical", "warmup", "supervised", "supervised/teacher", "mean_teacher",
                                "mean_teacher/teacher", "qualiteacher", "qualiteacher/teacher"]
    members = [spec.name for spec in preset_specs("offline", "dehaze")]  # looked up, not hard-coded
    for col in ["psnr", "ssim", "heldout", "fused", "fused_all", *(f"norm_{m}" for m in members)]:
        assert runs[col].notna().all(), col
    assert (runs["heldout"] == runs["norm_piqe"]).all()
    assert math.isfinite(runs.loc["qualiteacher", "rho"])
    assert runs.loc[["supervised", "mean_teacher", "warmup"], "rho"].isna().all()
    for path in result.files.values():
        assert path.is_file() and path.stat().st_size > 0, path
    assert "qualiteacher" in result.files["table"].read_text()
    # MLflow: the study run holds a warm-up run (with the pipeline's stage runs) and a run per mode
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study_id = json.loads((tmp_path / "study" / "mlflow_state.json").read_text())["parent_run_id"]
    exp = client.get_run(study_id).info.experiment_id

    def children(run_id):
        found = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        return {r.info.run_name: r.info.run_id for r in found}

    kids = children(study_id)
    assert {f"dehaze-{m}-seed0" for m in ("warmup", "supervised", "mean_teacher", "qualiteacher")} <= set(kids)
    assert {"dehaze-stage1", "dehaze-stage2"} <= set(children(kids["dehaze-warmup-seed0"]))
    assert client.get_metric_history(kids["dehaze-qualiteacher-seed0"], "stage3/pl")

    # a killed study: one run's result is lost, another's half-written; the rerun redoes just those
    res = tmp_path / "study" / "results"
    kept = (res / "supervised-seed0.json").stat().st_mtime_ns
    (res / "mean_teacher-seed0.json").unlink()
    (res / "qualiteacher-seed0.json").write_text('{"rows": [')
    trained, warm = [], []
    train_stage, run_pipeline = runner.run_training_stage, warmup.run_pipeline
    monkeypatch.setattr(runner, "run_training_stage", lambda plan, *a: trained.append(plan.cfg.out_dir) or train_stage(plan, *a))
    monkeypatch.setattr(warmup, "run_pipeline", lambda *a, **k: warm.append(a) or run_pipeline(*a, **k))
    again = run_study(s)
    assert again.trained == ["mean_teacher-seed0", "qualiteacher-seed0"]
    assert [p.split("/")[-1] for p in trained] == ["mean_teacher-seed0", "qualiteacher-seed0"] and warm == []
    assert (res / "supervised-seed0.json").stat().st_mtime_ns == kept
    assert len(again.runs) == len(result.runs)
    # seeds trained in another folder come together (`--merge`): the finished runs are copied, nothing trains
    trained.clear()
    merged = run_study(StudySettings(**{**s.__dict__, "out": str(tmp_path / "merged"), "merge": (s.out,)}))
    assert merged.trained == [] and trained == [] and warm == []
    pd.testing.assert_frame_equal(merged.runs, again.runs)
    assert merged.files["table"].read_text() == again.files["table"].read_text()
    # the same folder with other settings is refused
    with pytest.raises(StudyMismatch, match="steps"):
        run_study(StudySettings(**{**s.__dict__, "steps": 3}))


def test_study_command_line_errors_exit_2(tmp_path, capsys, monkeypatch):
    from qualiteacher.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["study", "--preset", "tiny", "--modes", "nonsense", "--out", str(tmp_path / "s")]) == 2
    assert "unknown training mode" in capsys.readouterr().err
    assert main(["study", "--preset", "tiny", "--held-out-member", "musiq", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "held-out member 'musiq'" in err and "piqe" in err
    assert not (tmp_path / "s").exists()  # nothing written before the settings are known to be good


def test_oracle_gap_is_the_share_of_warmup_to_oracle_per_seed():
    from qualiteacher.study.report import summarize, with_oracle_gap

    runs = pd.DataFrame([
        {"restorer": "warmup", "seed": 0, "psnr": 14.0}, {"restorer": "oracle", "seed": 0, "psnr": 18.0},
        {"restorer": "qualiteacher", "seed": 0, "psnr": 16.0},
        {"restorer": "warmup", "seed": 1, "psnr": 10.0}, {"restorer": "oracle", "seed": 1, "psnr": 20.0},
        {"restorer": "qualiteacher", "seed": 1, "psnr": 17.5},
        {"restorer": "qualiteacher", "seed": 2, "psnr": 17.5},  # no oracle for seed 2: no share
    ])
    gap = with_oracle_gap(runs).set_index(["restorer", "seed"])["oracle_gap"]
    assert gap[("qualiteacher", 0)] == pytest.approx(0.5) and gap[("qualiteacher", 1)] == pytest.approx(0.75)
    assert gap[("oracle", 0)] == 1.0 and gap[("warmup", 1)] == 0.0 and math.isnan(gap[("qualiteacher", 2)])
    summary = summarize(runs, ["warmup", "oracle", "qualiteacher"])
    assert summary.loc["qualiteacher", "oracle_gap_mean"] == pytest.approx(0.625)


def test_measures_include_the_clean_input_rows(fast_ensemble_factory):
    from qualiteacher.study.measures import measure_restorers

    torch.manual_seed(0)
    test = [(f"{i}", torch.rand(3, 32, 32) * 0.5, torch.rand(3, 32, 32)) for i in range(2)]
    table = measure_restorers({"input": lambda x: x, "darken": lambda x: x * 0.9}, test,
                              fast_ensemble_factory(), held_out=None)
    assert math.isnan(table.loc["input", "clean_psnr"])
    # darkening a clean image by 10 % costs a known PSNR: 10 log10(1 / mean((0.1 gt)^2))
    expected = np.mean([10 * np.log10(1 / float(((0.1 * gt) ** 2).mean())) for _, _, gt in test])
    assert table.loc["darken", "clean_psnr"] == pytest.approx(expected, abs=0.05)
    assert 0 < table.loc["darken", "clean_ssim"] <= 1
