"""Degradation-ladder sanity check of every task's offline preset (held-out photos, 128 px).

For each task: 3 photos the NIQE fit never saw, each degraded at 5 increasing strengths by the
task's degradation and by generic blur, noise and JPEG. The fused score must fall with strength:
mean Spearman rho (sign flipped) >= 0.9 over the photos, for every kind. Member rhos are printed.
"""
from pathlib import Path

import pytest

from qualiteacher.iqa import build_ensemble
from qualiteacher.iqa.presets import TASKS
from qualiteacher.iqa.sanity import GENERIC_KINDS, held_out_photos, ladder_summary, ladder_table

MIN_MEAN_RHO = 0.9
SIZE = 128




@pytest.fixture(scope="module")
def photos():
    return held_out_photos(SIZE)


@pytest.mark.parametrize("task", TASKS)
def test_offline_preset_orders_degradation_ladders(task: str, photos, qt_home: Path) -> None:
    ensemble = build_ensemble("offline", task=task)
    table = ladder_table(ensemble, photos, [task, *GENERIC_KINDS])
    summary = ladder_summary(table)
    print(f"\n[{task}] mean Spearman rho (1 = score falls with strength)\n{summary.round(2).to_string()}")
    assert set(summary.index) == {task, *GENERIC_KINDS}
    fused = summary["fused"]
    assert (fused >= MIN_MEAN_RHO - 1e-9).all(), f"fused rho below {MIN_MEAN_RHO}:\n{fused}"  # 1e-9: a mean of 0.7, 1, 1
