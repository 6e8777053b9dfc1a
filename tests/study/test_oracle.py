"""The study's oracle (target-domain upper bound): its data exists, matches the unlabeled images,
and nothing but the oracle mode can read it."""
import numpy as np
import pytest
from PIL import Image

from qualiteacher.data.layouts import read_layout
from qualiteacher.study.modes import MODES, mode_data_overrides


def test_demo_writes_the_unlabeled_ground_truth_aside(demo_root):
    for task in ("dehaze", "lowlight"):
        unlabeled = sorted((demo_root / task / "unlabeled").glob("*.png"))
        oracle_lq = sorted((demo_root / "oracle" / task / "lq").glob("*.png"))
        oracle_gt = sorted((demo_root / "oracle" / task / "gt").glob("*.png"))
        assert [p.name for p in unlabeled] == [p.name for p in oracle_lq] == [p.name for p in oracle_gt]
        for u, o in zip(unlabeled, oracle_lq):
            assert u.read_bytes() == o.read_bytes()  # the same real-domain image
        # a ground truth, not the degraded image
        assert not np.array_equal(np.asarray(Image.open(oracle_gt[0])), np.asarray(Image.open(oracle_lq[0])))
        # no layout reading the task folder sees it
        for layout, root in (("unpaired", demo_root / task / "unlabeled"), ("paired", demo_root / task / "labeled")):
            assert all("oracle" not in str(r.lq) and "oracle" not in str(r.gt or "") for r in read_layout(layout, root))


def test_only_the_oracle_mode_gets_the_oracle_folder(demo_root, tmp_path):
    for mode in MODES:
        over = mode_data_overrides(mode, str(demo_root), "dehaze")
        assert bool(over) == (mode == "oracle")
    assert mode_data_overrides("oracle", str(demo_root), "dehaze")["labeled_root"] == f"{demo_root}/oracle/dehaze"
    with pytest.raises(FileNotFoundError, match="ground truth"):
        mode_data_overrides("oracle", str(tmp_path), "dehaze")


def test_a_study_on_data_not_built_yet_checks_the_oracle_folder_once_the_data_exists(tmp_path):
    # the study builds the demo data (oracle pairs included) after validating its settings
    from qualiteacher.study.runner import StudySettings, run_config, seed_config
    from qualiteacher.study.store import RunKey, StudyStore

    store = StudyStore(tmp_path / "study")
    fresh = tmp_path / "not_built"
    cfg = seed_config(StudySettings(preset="tiny", data_root=str(fresh)), store, seed=0)
    rcfg = run_config(cfg, store, RunKey("oracle", 0), steps=2, held_out=None)
    assert rcfg.stage3["data"]["labeled_root"] == f"{fresh}/oracle/dehaze"
    (fresh / "dehaze" / "labeled").mkdir(parents=True)  # data there, but no oracle pairs: refused
    with pytest.raises(FileNotFoundError, match="ground truth"):
        run_config(cfg, store, RunKey("oracle", 0), steps=2, held_out=None)
