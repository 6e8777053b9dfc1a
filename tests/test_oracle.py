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
