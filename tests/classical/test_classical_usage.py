"""Where the classical restorers and the colour measures show up: `evaluate --baseline classical:NAME`,
the pipeline's grid, the study's table, the app's comparison."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from qualiteacher.classical import CLASSICAL


def test_evaluate_runs_classical_baselines_with_colour_columns(tmp_path, demo_root, capsys):
    from qualiteacher.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", "--task", "dehaze", "--data", str(demo_root), "--baseline", "classical:dcp",
                 "--baseline", "mine=classical:dehaze", "--metrics", "piqe", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    table = pd.read_csv(out / "results.csv", index_col=0)
    assert list(table.index) == ["input", "classical:dcp", "mine"]
    assert table.loc["classical:dcp", "psnr"] > table.loc["input", "psnr"]   # the prior removes demo haze
    assert table.loc["classical:dcp", "delta_e"] < table.loc["input", "delta_e"]
    assert table.loc["mine", "psnr"] == table.loc["classical:dcp", "psnr"]   # a task name: its default
    assert table[["colour_corr", "delta_e"]].notna().all().all()
    md = (out / "results.md").read_text()
    assert "colour corr ↑" in md and "ΔE76 ↓" in md
    assert main(["evaluate", "--task", "dehaze", "--data", str(demo_root), "--baseline", "classical:nope",
                 "--out", str(tmp_path / "x"), "--no-progress", "--device", "cpu"]) == 2
    assert "unknown classical restorer 'nope'" in capsys.readouterr().err


def test_grid_puts_the_classical_restorer_beside_the_student():
    from types import SimpleNamespace

    from qualiteacher.archs.presets import build_unet
    from qualiteacher.pipeline.grids import grid_rows

    net = build_unet("tiny").eval()
    module = SimpleNamespace(student=net, teacher=net)
    x, gt = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    rows, titles = grid_rows(module, x, [0, 7], None, gt=gt, classical=CLASSICAL["dcp"].fn)
    assert titles == ["input", "teacher", "student@0", "student@7", "classical", "ground truth"]
    assert len(rows) == 2 and torch.equal(rows[1][4], CLASSICAL["dcp"].fn(x)[1])
    _, plain = grid_rows(module, x, [7], None)
    assert "classical" not in plain


def test_study_table_ranks_the_classical_row_and_reads_delta_e_as_lower_better():
    from qualiteacher.study.report import row_order, summarize, summary_markdown

    rows = []
    for seed in (0, 1):
        rows += [{"restorer": "input", "seed": seed, "psnr": 10.0, "colour_corr": 0.7, "delta_e": 30.0},
                 {"restorer": "classical", "seed": seed, "psnr": 16.0, "colour_corr": 0.72, "delta_e": 20.0},
                 {"restorer": "warmup", "seed": seed, "psnr": 14.0, "colour_corr": 0.5, "delta_e": 25.0},
                 {"restorer": "qualiteacher", "seed": seed, "psnr": 15.0, "colour_corr": 0.6, "delta_e": 22.0}]
    runs = pd.DataFrame(rows)
    order = row_order(runs, ["qualiteacher"])
    assert order == ["input", "classical", "warmup", "qualiteacher"]
    text = summary_markdown(summarize(runs, order), None)
    assert "colour corr ↑" in text and "ΔE76 ↓" in text
    classical = next(line for line in text.splitlines() if line.startswith("| classical |"))
    assert "**16.00 ± 0.00**" in classical and "**20.000 ± 0.000**" in classical  # best PSNR, lowest ΔE
    assert "**" not in next(line for line in text.splitlines() if line.startswith("| input |"))


@pytest.fixture(scope="module")
def handlers(fast_ensemble_factory):
    from qualiteacher.app.model import AppModel
    from qualiteacher.app.ui import Handlers
    from qualiteacher.archs.presets import build_unet

    model = AppModel(build_unet("tiny").eval(), None, "dehaze", "offline", None, 7, "test")
    return Handlers(model, fast_ensemble_factory("dehaze"))


def test_app_shows_a_classical_restoration_with_its_scores(handlers, demo_root):
    path = sorted((demo_root / "dehaze" / "test" / "lq").glob("*.png"))[0]
    image, text = handlers.classical({"path": str(path)}, "dcp")
    assert image.shape == (48, 48, 3) and image.dtype.name == "uint8"
    assert "**dcp**" in text and "**fused**" in text and "| input | dcp |" in text
    assert handlers.classical({"path": str(path)}, "none") == (None, "")
    image, text = handlers.classical(None, "dcp")
    assert image is None and text.startswith("⚠️") and "Upload an image" in text


def test_app_page_offers_the_task_default(handlers):
    from qualiteacher.app.ui import build_app

    page = build_app(handlers.model, handlers.ensemble)
    dropdowns = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == "qt-classical-method"]
    assert len(dropdowns) == 1 and dropdowns[0].value == "dcp"
    assert [c[0] for c in dropdowns[0].choices][:2] == ["none", "dcp"]
