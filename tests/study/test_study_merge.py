"""`qualiteacher study --merge`: seeds trained in other study folders come together in one table."""
import json

import pytest

from qualiteacher.study.store import RunKey, StudyMismatch, StudyStore

SETTINGS = {"task": "dehaze", "preset": "tiny", "student": "iqpir", "steps": 2, "held_out": "piqe",
            "data_root": "data", "configs": [], "overrides": [], "variants": {}}


def _study(folder, runs, settings=SETTINGS):
    """A study folder holding ``runs`` ({name: psnr}) as finished result files."""
    store = StudyStore(folder)
    store.check_settings(settings)
    for name, psnr in runs.items():
        mode, seed = name.rsplit("-seed", 1)
        store.write(RunKey(mode, int(seed)), [{"mode": mode, "seed": int(seed), "restorer": mode, "psnr": psnr}])
    (folder / "labeled_quality.csv").write_text("image,fused\na.png,0.5\n")
    return store


def test_merge_copies_the_runs_this_folder_lacks(tmp_path):
    _study(tmp_path / "a", {"warmup-seed0": 17.0, "qualiteacher-seed0": 18.0})
    _study(tmp_path / "b", {"warmup-seed2": 16.0, "qualiteacher-seed2": 17.5, "qualiteacher-seed0": 18.0})
    here = StudyStore(tmp_path / "all")
    found = here.plan_merge([tmp_path / "a", tmp_path / "b"], SETTINGS)
    assert not (tmp_path / "all").exists(), "planning a merge writes nothing"
    here.check_settings(SETTINGS)
    copied = here.copy_in(found)
    # the same run in both folders with the same rows is taken once
    assert copied == ["qualiteacher-seed0", "qualiteacher-seed2", "warmup-seed0", "warmup-seed2"]
    assert here.read(RunKey("qualiteacher", 2))[0]["psnr"] == 17.5
    assert here.read(RunKey("warmup", 0))[0]["psnr"] == 17.0
    assert (tmp_path / "all" / "labeled_quality.csv").read_text().startswith("image,fused")
    keys = [RunKey(m, s) for s in (0, 2) for m in ("warmup", "qualiteacher")]
    assert list(here.rows(keys)["psnr"]) == [17.0, 18.0, 16.0, 17.5]
    # merging again finds nothing new
    assert here.copy_in(here.plan_merge([tmp_path / "a", tmp_path / "b"], SETTINGS)) == []


def test_merge_refuses_other_settings_and_conflicting_runs_before_copying(tmp_path):
    here = _study(tmp_path / "here", {"qualiteacher-seed0": 18.0})
    _study(tmp_path / "other_steps", {"qualiteacher-seed1": 18.2}, {**SETTINGS, "steps": 3})
    with pytest.raises(StudyMismatch, match="steps: 3 there, 2 here"):
        here.plan_merge([tmp_path / "other_steps"], SETTINGS)
    # the same run trained twice with different results: the user must choose, nothing is copied
    _study(tmp_path / "ok", {"qualiteacher-seed1": 18.1})
    _study(tmp_path / "clash", {"qualiteacher-seed0": 17.0})
    with pytest.raises(StudyMismatch, match="qualiteacher-seed0 is in .* with different results"):
        here.plan_merge([tmp_path / "ok", tmp_path / "clash"], SETTINGS)
    assert here.read(RunKey("qualiteacher", 1)) is None
    with pytest.raises(StudyMismatch, match="not a study folder"):
        here.plan_merge([tmp_path / "missing"], SETTINGS)
    with pytest.raises(StudyMismatch, match="own folder"):
        here.plan_merge([tmp_path / "here"], SETTINGS)


def test_an_unreadable_result_is_reported_and_skipped(tmp_path, capsys):
    _study(tmp_path / "b", {"qualiteacher-seed1": 18.1, "mean_teacher-seed1": 17.9})
    (tmp_path / "b" / "results" / "mean_teacher-seed1.json").write_text('{"rows": [')  # killed mid-write
    here = StudyStore(tmp_path / "here")
    here.check_settings(SETTINGS)
    assert here.copy_in(here.plan_merge([tmp_path / "b"], SETTINGS)) == ["qualiteacher-seed1"]
    assert "mean_teacher-seed1.json is unreadable: skipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "here" / "results" / "qualiteacher-seed1.json").read_text())["rows"][0]["psnr"] == 18.1


def test_study_command_merge_error_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, demo_root):
    from qualiteacher.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s"
    assert main(["study", "--preset", "tiny", "--out", str(out), "--data-root", str(demo_root),
                 "--merge", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "not a study folder" in err and len(err.strip().splitlines()) == 1
    assert not (out / "study.json").exists() and not (out / "results").exists()
