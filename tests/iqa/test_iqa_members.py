"""Members, normalisation, fusion, levels, YAML round trip and the preset catalogue."""
from pathlib import Path

import pytest
import torch
import yaml

from qualiteacher.iqa.ensemble import load_specs_yaml, specs_version
from qualiteacher.iqa.members import (
    MemberSpec,
    Normalization,
    default_level,
    fit_quantile_levels,
    fuse_scores,
    normalize_score,
    quantile_level,
)
from qualiteacher.iqa.presets import PRESETS, TASKS, list_iqa_presets, preset_specs, write_preset_yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "iqa"


def test_range_normalisation_clamps_and_inverts() -> None:
    raw = torch.tensor([-10.0, 0.0, 25.0, 100.0, 130.0])
    up = normalize_score(raw, Normalization("range", 0.0, 100.0), higher_better=True)
    down = normalize_score(raw, Normalization("range", 0.0, 100.0), higher_better=False)
    assert torch.allclose(up, torch.tensor([0.0, 0.0, 0.25, 1.0, 1.0]))
    assert torch.allclose(down, 1 - up)
    # the paper's BRISQUE rule b = (100 - max(B, 0)) / 100 inside [0, 100]
    assert torch.allclose(down[2], torch.tensor((100 - 25) / 100))


def test_minmax_normalisation_uses_the_batch() -> None:
    raw = torch.tensor([2.0, 4.0, 6.0])
    assert torch.allclose(normalize_score(raw, Normalization("minmax"), True), torch.tensor([0.0, 0.5, 1.0]))


def test_fuse_renormalises_weights() -> None:
    norm = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 0.0])}
    fused = fuse_scores(norm, {"a": 0.4, "b": 0.4})
    assert torch.allclose(fused, torch.tensor([0.5, 0.0]))
    paper = fuse_scores({"m": torch.tensor([0.5]), "c": torch.tensor([1.0]), "b": torch.tensor([0.25])},
                        {"m": 0.4, "c": 0.2, "b": 0.4})
    assert torch.allclose(paper, torch.tensor([0.4 * 0.5 + 0.2 * 1.0 + 0.4 * 0.25]))


def test_default_level_rule() -> None:
    s = torch.tensor([0.0, 0.05, 0.1, 0.39, 0.65, 0.69, 0.7, 0.95, 1.0])
    assert default_level(s).tolist() == [0, 0, 1, 3, 6, 6, 7, 7, 7]
    assert default_level(s).dtype == torch.long


def test_quantile_levels_spread_a_pool_evenly() -> None:
    pool = torch.rand(800, generator=torch.Generator().manual_seed(0)) ** 3  # skewed pool
    thresholds = fit_quantile_levels(pool)
    assert thresholds.shape == (7,) and torch.all(thresholds[1:] >= thresholds[:-1])
    counts = torch.bincount(quantile_level(pool, thresholds), minlength=8)
    assert counts.min() >= 90 and counts.max() <= 110
    with pytest.raises(ValueError, match="need >= 8"):
        fit_quantile_levels(torch.rand(3))


def test_memberspec_validation() -> None:
    ok = dict(name="x", backend="physical:contrast", weight=1.0, normalization=Normalization(),
              higher_better=True, differentiable=True)
    MemberSpec(**ok)
    with pytest.raises(ValueError, match="backend"):
        MemberSpec(**{**ok, "backend": "contrast"})
    with pytest.raises(ValueError, match="not differentiable"):
        MemberSpec(**{**ok, "differentiable": False})
    with pytest.raises(ValueError, match="hi > lo"):
        Normalization("range", 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        MemberSpec.from_dict({**ok, "normalization": {}, "colour": 1})


@pytest.mark.parametrize("preset", list(PRESETS))
def test_yaml_round_trip_and_config_mirror(preset: str, tmp_path: Path) -> None:
    path = write_preset_yaml(preset, tmp_path / f"{preset}.yaml")
    for task in (None, *TASKS):
        assert load_specs_yaml(path, task) == preset_specs(preset, task)
    shipped = CONFIG_DIR / f"{preset}.yaml"
    assert yaml.safe_load(shipped.read_text()) == PRESETS[preset], f"{shipped} is out of date: write_preset_yaml"


def test_spec_round_trip_through_dicts() -> None:
    for task in TASKS:
        specs = preset_specs("offline", task)
        assert [MemberSpec.from_dict(s.to_dict()) for s in specs] == specs
        assert specs_version(specs) == specs_version([MemberSpec.from_dict(s.to_dict()) for s in specs])
    assert specs_version(preset_specs("offline", "dehaze")) != specs_version(preset_specs("offline", "derain"))


def test_preset_catalogue() -> None:
    assert list_iqa_presets() == ["paper", "offline", "offline_v5", "offline_v4", "offline_v3", "offline_v2", "offline_v1"]
    paper = {s.name: s for s in preset_specs("paper")}
    assert {n: s.weight for n, s in paper.items()} == {"musiq": 0.4, "clip": 0.2, "brisque": 0.4}
    assert paper["musiq"].normalization == Normalization("range", 0.0, 100.0)
    for task in TASKS:
        names = [s.name for s in preset_specs("offline_v1", task)]
        assert names[:3] == ["piqe", "brisque", "niqe"] and len(names) == 6
        names = [s.name for s in preset_specs("offline", task)]
        old = ["piqe", "brisque", "niqe", "blockiness", "clipping", "colourfulness", "colour_cast"]
        assert names[:7] == old and [s.name for s in preset_specs("offline_v2", task)][:7] == old
        assert names[7:10] == ["chroma_spread", "chroma_noise", "hue_naturalness"]  # issue 25
        # offline_v5 is offline before the blur-ladder weights: desnow's veil and low light's contrast
        now, v5, v4, v3 = (preset_specs(p, task) for p in ("offline", "offline_v5", "offline_v4", "offline_v3"))
        changed = {"desnow": ["veil"], "lowlight": ["contrast"]}.get(task, [])
        assert [s.name for s in v5] == names and [a.name for a, b in zip(now, v5) if a != b] == changed
        assert [(a.weight, b.weight) for a, b in zip(now, v5) if a != b] == [(0.3, {"desnow": 0.2}.get(task, 0.1))] * len(changed)
        # offline_v4 is offline_v5 before neutral clipping: the same members, one option apart
        now = v5
        assert [s.name for s in v4] == [s.name for s in v3] == names
        assert [a.name for a, b in zip(now, v4) if a != b] == ["clipping"]
        assert now[4].options == {"neutral": 1.0} and v4[4].options == {}
        # offline_v3 is offline_v4 before the blockiness recalibration: one range apart
        assert [a.name for a, b in zip(v4, v3) if a != b] == ["blockiness"]
        assert v4[3].normalization == Normalization("range", 0.1, 1.0)
        niqe = {s.name: s for s in preset_specs("offline", task)}["niqe"]
        assert niqe.options == {"native": True}  # graded at the image's own size, no upsampling
        assert {s.name: s for s in preset_specs("offline_v1", task)}["niqe"].options == {}
    with pytest.raises(KeyError, match="unknown IQA preset"):
        preset_specs("nope")
    with pytest.raises(ValueError, match="unknown task"):
        preset_specs("offline", "deblur")


def test_bad_yaml_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("members:\n  - {name: a, backend: 'physical:contrast'}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_specs_yaml(bad)
    with pytest.raises(FileNotFoundError):
        load_specs_yaml(tmp_path / "missing.yaml")


def test_clipping_neutral_counts_grey_clipping_not_vivid_colour():
    from qualiteacher.iqa.image_stats import clipping

    vivid = torch.zeros(1, 3, 8, 8)
    vivid[:, 0], vivid[:, 1] = 0.95, 0.5  # a saturated orange: its blue channel is at 0
    grey = torch.zeros(1, 3, 8, 8)        # crushed black: every channel at 0
    full = clipping(grey).item()  # 0.92: the soft threshold at 0 (margin 0.01, softness 0.004)
    assert full > 0.9 and clipping(vivid).item() == pytest.approx(full, rel=1e-3)  # the default counts both alike
    assert clipping(vivid, neutral=1.0).item() == pytest.approx(full * 0.05, rel=1e-3)  # 1 - chroma 0.95
    assert clipping(grey, neutral=1.0).item() == pytest.approx(full)
    assert clipping(vivid, neutral=0.5).item() == pytest.approx(full * 0.525, rel=1e-3)
    with pytest.raises(ValueError, match="neutral"):
        clipping(grey, neutral=1.5)
