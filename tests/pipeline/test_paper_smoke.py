"""The paper path end to end on the CPU: the `paper` preset's structure with stand-in weights.

`qualiteacher pipeline dehaze --preset paper` with the paper ensemble (MUSIQ and CLIP ViT-B-32 with
random weights, BRISQUE from the shipped LIVE parameters: QUALITEACHER_RANDOM_IQA=1), IQPIR at the
`paper-smoke` size (the paper's layout, 1/8 of its widths), a stand-in VGG16 file for the stage-1
perceptual loss, bf16-mixed as the preset says, 64-px images and 2-3 steps per stage: data, every
training stage, evaluation and registration. Deselect with ``-m "not paper_smoke"``. The same run at
the paper's size on a GPU is the README's command (section "The paper preset").
"""
import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from qualiteacher.iqa.presets import MEANINGLESS
from qualiteacher.pipeline.cli import run_pipeline_cli
from qualiteacher.pipeline.config import student_stages
from qualiteacher.pipeline.resolve import resolve_config

pytestmark = pytest.mark.paper_smoke


def _stand_in_vgg16(path: Path) -> Path:
    # VGG16 feature layers up to relu4_3, random weights, saved under torchvision's key names
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features[:23]
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def _smoke_config(tmp_path: Path) -> Path:
    """Sizes and step counts only; everything else comes from configs/presets/paper.yaml."""
    small = {"crop_size": 64, "batch_size": 2, "num_workers": 0}
    cfg = {
        "demo": {"size": 64, "tasks": ["dehaze"], "n_labeled": 4, "n_unlabeled": 4, "n_test": 2, "n_clean": 2},
        "checkpoint_every": 2,
        "progress": False,
        "eval": {"max_images": 1, "levels": [0, 7], "grid_levels": [7]},
        "stage1": {"model": {"preset": "paper-smoke", "gan_start_step": 1,
                             "perceptual_weights": str(_stand_in_vgg16(tmp_path / "vgg16_stand_in.pth"))},
                   "data": small, "trainer": {"max_steps": 3}},   # 1 generator step, then one with the GAN
        "stage2": {"model": {"preset": "paper-smoke"}, "data": small, "trainer": {"max_steps": 2}},
        # MUSIQ (random) costs ~2 s per 64-px image on one CPU thread: few candidates per step
        "stage3": {"model": {"preset": "paper-smoke", "pref_start_step": 1, "crop_start_step": 1,
                             "views": ["identity", "hflip"], "n_aug_variants": 1},
                   "data": small, "trainer": {"max_steps": 2}},
    }
    if "fidelity" in student_stages(resolve_config("dehaze", "paper").student):  # the fusion stage between stage 2 and stage 3
        cfg["fidelity"] = {"model": {"preset": "paper-smoke"}, "data": small, "trainer": {"max_steps": 2}}
    path = tmp_path / "paper_smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_paper_preset_runs_end_to_end_with_stand_in_weights(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("QUALITEACHER_RANDOM_IQA", "1")
    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")          # nothing may be downloaded
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # and no cached weight is used
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["--preset", "paper", "--config", str(_smoke_config(tmp_path)), f"--data_root={tmp_path / 'data'}",
            f"--out_dir={out}"]
    assert run_pipeline_cli("dehaze", args) == 0
    printed = capsys.readouterr()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["stage3"]["model"]["iqa_preset"] == "paper" and cfg["stage3"]["trainer"]["precision"] == "bf16-mixed"
    assert cfg["stage1"]["model"]["w_perceptual"] > 0

    state = json.loads((out / "state.json").read_text())
    expected = ["data", "stage1", "stage2", *(["fidelity"] if "fidelity" in cfg else []), "stage3", "eval",
                "register"]
    assert [s for s in expected if state["stages"][s].get("done")] == expected

    # the paper ensemble graded everything, and every table and run says its scores are meaningless
    assert "stand-in weights" in printed.err and "IQA SCORES ARE MEANINGLESS" in printed.out
    per_image = __import__("pandas").read_csv(out / "eval" / "per_image.csv")
    assert {"raw_musiq", "raw_clip", "raw_brisque"} <= set(per_image.columns)
    for table in ("eval/per_image.csv", "eval/results.csv", "eval/score_vs_level.csv", "labeled_quality.csv"):
        assert set(__import__("pandas").read_csv(out / table)["iqa_scores"]) == {MEANINGLESS}, table
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(state["parent_run_id"]).data.tags["iqa_scores"] == MEANINGLESS
    for stage in expected:
        assert client.get_run(state["stages"][stage]["run_id"]).data.tags["iqa_scores"] == MEANINGLESS, stage

    # every stage trained what the paper preset says: perceptual + GAN in stage 1, all stage-3 terms
    s1 = state["stages"]["stage1"]["run_id"]
    assert client.get_metric_history(s1, "stage1/perceptual") and client.get_metric_history(s1, "stage1/gan_g")
    s3 = state["stages"]["stage3"]["run_id"]
    for term in ("pl", "pref_a", "pref_b", "crop"):
        values = [m.value for m in client.get_metric_history(s3, f"stage3/{term}")]
        assert len(values) == 2 and all(torch.isfinite(torch.tensor(values))), term
        assert any(v != 0 for v in values), term
    final = torch.load(out / "stage3" / "final.ckpt", map_location="cpu", weights_only=False)
    assert final["hyper_parameters"]["preset"] == "paper-smoke"
    assert sum(k.startswith("student.transformer.blocks.8.") for k in final["state_dict"]) > 0  # 9 layers
    assert not any(k.startswith("ensemble.") for k in final["state_dict"])
    assert client.search_model_versions("name = 'qualiteacher-dehaze'")
    assert os.environ.get("QUALITEACHER_RANDOM_IQA") == "1"  # still set: nothing turned it off mid-run
