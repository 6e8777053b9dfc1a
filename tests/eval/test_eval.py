"""Evaluation package: full-reference metrics, NR-IQA versus level, reports, figures, detection mAP."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from qualiteacher.archs.output import StudentOutput
from qualiteacher.data.io import write_image
from qualiteacher.data.records import ImageRecord
from qualiteacher.eval.detection import (
    Detections,
    GroundTruth,
    average_precision,
    detections_from_csv,
    evaluate_detections,
    ground_truths_from_records,
)
from qualiteacher.eval.figures import image_grid, plot_score_vs_level, save_png
from qualiteacher.eval.fullref import psnr, ssim, to_y
from qualiteacher.eval.nriqa import level_spearman, score_levels
from qualiteacher.eval.report import build_restorers, evaluate_restorers, format_table, identity, summary_table

try:
    from qualiteacher.iqa.ensemble import EnsembleScores
except ImportError:  # the IQA part is written in parallel; same fields as in docs/design.md
    class EnsembleScores(NamedTuple):
        raw: dict
        normalized: dict
        fused: Tensor
        level: Tensor


class BrightnessEnsemble(nn.Module):
    """Scores mean brightness (fused) and mean of the red channel (second member)."""

    def forward(self, images: Tensor) -> EnsembleScores:
        bright = images.mean(dim=(1, 2, 3))
        red = images[:, 0].mean(dim=(1, 2))
        fused = bright
        level = (fused * 10).floor().clamp(0, 7).long()
        return EnsembleScores({"bright": bright * 100, "red": red}, {"bright": bright, "red": red}, fused, level)


class LevelBrightness(nn.Module):
    """Toy conditioned student: output brightness grows with the level (sign < 0 reverses it)."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, x: Tensor, level: Tensor | None) -> StudentOutput:
        lv = torch.full((x.shape[0],), 7.0) if level is None else level.float()
        gain = 0.5 + self.sign * (lv - 3.5) / 10.0  # 0.15 .. 0.85
        return StudentOutput(x * gain.view(-1, 1, 1, 1), torch.zeros(()))


def _rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- full reference

def test_psnr_constant_offset_is_20_db() -> None:
    x = torch.full((2, 3, 16, 16), 0.2)
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2,), 20.0), atol=1e-4)


def test_psnr_identical_is_inf_and_per_image() -> None:
    x = _rand(3, 3, 16, 16)
    y = x.clone()
    y[1] = (y[1] + 0.1).clamp(0, 1)
    values = psnr(y, x)
    assert values.shape == (3,)
    assert math.isinf(values[0]) and math.isinf(values[2]) and math.isfinite(values[1])


def test_psnr_y_channel_and_border() -> None:
    x = torch.full((1, 3, 16, 16), 0.2)
    # a grey offset of 0.1 becomes 0.1 * 219/255 in studio-swing luma
    expected = 20.0 - 20.0 * math.log10(219.0 / 255.0)
    assert psnr(x + 0.1, x, y_channel=True).item() == pytest.approx(expected, abs=1e-3)
    assert to_y(torch.ones(1, 3, 2, 2)).flatten()[0].item() == pytest.approx(235 / 255, abs=1e-5)
    y = x.clone()
    y[..., :2, :] += 0.3  # differs only in a 2-px top border
    assert math.isfinite(psnr(y, x).item())
    assert math.isinf(psnr(y, x, border=2).item())
    with pytest.raises(ValueError, match="border"):
        psnr(y, x, border=8)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[..., :8])


def test_ssim_identity_and_matches_skimage() -> None:
    x = _rand(2, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ours = ssim(y, x)
    for i in range(2):
        ref = structural_similarity(y[i].permute(1, 2, 0).numpy(), x[i].permute(1, 2, 0).numpy(), channel_axis=2,
                                    data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)
    assert ssim(y, x, y_channel=True).shape == (2,)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


# ---------------------------------------------------------------- NR-IQA versus level

def test_score_levels_rows_and_spearman() -> None:
    images = _rand(3, 3, 32, 32)
    df = score_levels(LevelBrightness(), images, BrightnessEnsemble(), ids=["a", "b", "c"])
    assert len(df) == 3 * 8
    assert {"id", "level", "fused", "iqa_level", "norm_bright", "norm_red", "raw_bright"} <= set(df.columns)
    assert sorted(df["level"].unique()) == list(range(8))
    assert level_spearman(df) == pytest.approx(1.0)
    assert level_spearman(df, "norm_red") == pytest.approx(1.0)
    reverse = score_levels(LevelBrightness(sign=-1.0), images, BrightnessEnsemble(), levels=[0, 3, 7])
    assert level_spearman(reverse) == pytest.approx(-1.0)
    assert set(reverse["id"]) == {"0", "1", "2"}


def test_score_levels_images_of_different_sizes_and_flat_model() -> None:
    images = [_rand(3, 32, 32), _rand(3, 24, 40, seed=1)]
    df = score_levels(LevelBrightness(), images, BrightnessEnsemble(), levels=[2, 5], tile=None)
    assert len(df) == 4 and list(df["id"]) == ["0", "1", "0", "1"]

    class Flat(nn.Module):
        def forward(self, x: Tensor, level: Tensor | None) -> StudentOutput:
            return StudentOutput(x, torch.zeros(()))

    flat = score_levels(Flat(), images, BrightnessEnsemble(), levels=[2, 5])
    assert math.isnan(level_spearman(flat))  # no ordering to measure
    assert (flat["px_from_first"] == 0).all()  # the dial does not move the picture
    # gain 0.5 + (lv - 3.5) / 10: level 5 is 0.3 brighter than level 2 (x times 0.3, in 8-bit steps)
    expect = [float(im.mean() * 0.3 * 255) for im in images]
    moved = df[df["level"] == 5]["px_from_first"].tolist()
    assert moved == pytest.approx(expect, rel=1e-4)
    assert (df[df["level"] == 2]["px_from_first"] == 0).all()
    with pytest.raises(ValueError, match="ids"):
        score_levels(Flat(), images, BrightnessEnsemble(), ids=["only-one"])


# ---------------------------------------------------------------- report

def _tuple_records() -> list:
    gt = torch.full((3, 32, 32), 0.4)
    return [("with_gt", gt + 0.1, gt), ("no_gt", _rand(3, 32, 40), None), ("with_gt2", gt - 0.1, gt)]


def test_evaluate_restorers_rows_columns_and_metrics() -> None:
    restorers = {"input": identity, "darker": lambda x: x * 0.5}
    df = evaluate_restorers(restorers, _tuple_records(), BrightnessEnsemble(), "cpu")
    assert len(df) == 6
    assert {"id", "restorer", "fused", "iqa_level", "norm_bright", "norm_red", "psnr", "ssim"} <= set(df.columns)
    row = df[(df["id"] == "with_gt") & (df["restorer"] == "input")].iloc[0]
    assert row["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert row["fused"] == pytest.approx(0.5, abs=1e-5)
    dark = df[(df["id"] == "with_gt") & (df["restorer"] == "darker")].iloc[0]
    assert dark["fused"] == pytest.approx(0.25, abs=1e-5)
    assert df[df["id"] == "no_gt"]["psnr"].isna().all()

    table = summary_table(df)
    assert list(table.index) == ["input", "darker"]
    assert table.loc["input", "images"] == 3 and table.loc["input", "references"] == 2
    assert table.loc["input", "psnr"] == pytest.approx(20.0, abs=1e-3)
    text = format_table(table)
    assert "input" in text and "darker" in text and "psnr" in text


def test_evaluate_restorers_from_dataloader_and_records(tmp_path) -> None:
    class Dicts(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            return {"lq": _rand(3, 32, 32, seed=i), "id": f"im{i}"}

    loader = DataLoader(Dicts(), batch_size=2)
    df = evaluate_restorers({"input": identity, "copy": lambda x: x.clone()}, loader, BrightnessEnsemble())
    assert len(df) == 8 and set(df["id"]) == {"im0", "im1", "im2", "im3"}
    assert "psnr" not in format_table(summary_table(df))  # no reference anywhere: column hidden
    a = df[df["restorer"] == "input"]["fused"].to_numpy()
    b = df[df["restorer"] == "copy"]["fused"].to_numpy()
    assert np.allclose(a, b)

    lq, gt = tmp_path / "lq.png", tmp_path / "gt.png"
    write_image(lq, np.full((32, 32, 3), 0.5, np.float32))
    write_image(gt, np.full((32, 32, 3), 0.6, np.float32))
    df = evaluate_restorers({"input": identity}, [ImageRecord(id="x", lq=lq, gt=gt)], BrightnessEnsemble())
    assert df.loc[0, "psnr"] == pytest.approx(20.0, abs=0.2)  # 8-bit rounding

    with pytest.raises(ValueError, match="restorer 'crop'"):
        evaluate_restorers({"crop": lambda x: x[..., :16, :16]}, _tuple_records(), BrightnessEnsemble())
    with pytest.raises(TypeError, match="test items"):
        evaluate_restorers({"input": identity}, [42], BrightnessEnsemble())


def test_build_restorers_uses_levels() -> None:
    restorers = build_restorers(student=LevelBrightness(), teacher=LevelBrightness(), levels=(0, 7))
    assert list(restorers) == ["input", "teacher", "student@0", "student@7"]
    x = torch.full((1, 3, 32, 32), 0.5)
    assert restorers["student@0"](x).mean().item() < restorers["student@7"](x).mean().item()
    df = evaluate_restorers(restorers, [("a", x[0], None)], BrightnessEnsemble())
    fused = df.set_index("restorer")["fused"]
    assert fused["student@7"] == pytest.approx(0.5 * 0.85, abs=1e-5)


# ---------------------------------------------------------------- figures

def test_image_grid_shape_titles_and_blanks(tmp_path) -> None:
    rows = [[_rand(3, 32, 32), _rand(3, 64, 48), _rand(3, 32, 32)], [_rand(3, 32, 32), None]]
    grid = image_grid(rows, titles=["input", "teacher", "gt"])
    assert grid.dtype == np.uint8 and grid.shape == (24 + 2 * 32 + 2, 3 * 32 + 2 * 2, 3)
    plain = image_grid(rows, gap=0)
    assert plain.shape == (64, 96, 3)
    assert np.all(plain[32:, 64:] == 128)  # padded / None cells are grey
    assert np.array_equal(plain[:32, :32], (rows[0][0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    path = save_png(grid, tmp_path / "sub" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(ValueError, match="titles"):
        image_grid(rows, titles=["one"])
    with pytest.raises(ValueError, match="uint8"):
        save_png(grid.astype(np.float32), tmp_path / "bad.png")


def test_plot_score_vs_level_writes_png(tmp_path) -> None:
    df = score_levels(LevelBrightness(), _rand(2, 3, 32, 32), BrightnessEnsemble())
    path = plot_score_vs_level(df, tmp_path / "plots" / "levels.png", title="toy")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(KeyError, match="fused"):
        plot_score_vs_level(df.drop(columns="fused"), tmp_path / "x.png")


# ---------------------------------------------------------------- detection

def _gt(boxes, labels, difficult=None) -> GroundTruth:
    return GroundTruth(np.asarray(boxes, np.float32), labels, difficult)


def _det(boxes, scores, labels) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores), labels)


A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]
FAR = [100, 100, 110, 110]


def test_average_precision_by_hand() -> None:
    # ranks: TP, FP, TP with 2 objects -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert average_precision(recall, precision, "voc2010") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(recall, precision, "voc07_11pt") == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert average_precision(np.array([]), np.array([]), "voc2010") == 0.0
    assert average_precision(np.array([]), np.array([]), "voc07_11pt") == 0.0
    with pytest.raises(ValueError, match="unknown AP method"):
        average_precision(recall, precision, "coco")
    with pytest.raises(ValueError, match="non-decreasing"):
        average_precision(recall[::-1], precision)


def test_perfect_detector_map_is_one() -> None:
    gts = {"i1": _gt([A, B], ["car", "person"]), "i2": _gt([C], ["car"])}
    dets = {"i1": _det([B, A], [0.9, 0.8], ["person", "car"]), "i2": _det([C], [0.3], ["car"])}
    result = evaluate_detections(dets, gts)
    assert result.ap == {"car": 1.0, "person": 1.0} and result.mean_ap == 1.0
    assert result.num_gt == {"car": 2, "person": 1} and result.recall["car"] == 1.0


def test_false_positive_ranked_first_and_between() -> None:
    gts = {"i1": _gt([A], ["car"]), "i2": _gt([C], ["car"])}
    first = {"i1": _det([FAR, A], [0.9, 0.8], ["car", "car"]), "i2": _det([C], [0.7], ["car"])}
    assert evaluate_detections(first, gts).ap["car"] == pytest.approx(2 / 3)  # precision 0, 1/2, 2/3
    between = {"i1": _det([A, FAR], [0.9, 0.8], ["car", "car"]), "i2": _det([C], [0.7], ["car"])}
    assert evaluate_detections(between, gts).ap["car"] == pytest.approx(5 / 6)
    assert evaluate_detections(between, gts, method="voc07_11pt").ap["car"] == pytest.approx(28 / 33)


def test_missed_object_duplicate_and_iou_threshold() -> None:
    gts = {"i1": _gt([A, B], ["car", "car"])}
    missed = evaluate_detections({"i1": _det([A], [0.9], ["car"])}, gts)
    assert missed.recall["car"] == 0.5 and missed.ap["car"] == pytest.approx(0.5)
    # a second detection on the same box is a false positive, even with a higher IoU elsewhere later
    dup = evaluate_detections({"i1": _det([A, A, B], [0.9, 0.8, 0.7], ["car", "car", "car"])}, gts)
    assert dup.ap["car"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    shifted = [4, 0, 14, 10]  # IoU with A = 60 / 140 = 0.43
    assert evaluate_detections({"i1": _det([shifted], [0.9], ["car"])}, gts).ap["car"] == 0.0
    assert evaluate_detections({"i1": _det([shifted], [0.9], ["car"])}, gts, iou_threshold=0.4).ap["car"] == 0.5
    wrong_class = evaluate_detections({"i1": _det([A], [0.9], ["bus"])}, gts)
    assert wrong_class.ap == {"car": 0.0}


def test_class_without_gt_ignored_and_difficult() -> None:
    gts = {"i1": _gt([A, B], ["car", "person"], [False, True])}
    dets = {"i1": _det([A, B, C], [0.9, 0.8, 0.7], ["car", "person", "dog"])}
    result = evaluate_detections(dets, gts, classes=["car", "person", "dog"])
    assert result.ap["car"] == 1.0
    assert math.isnan(result.ap["person"]) and math.isnan(result.ap["dog"])  # difficult only / no object
    assert result.num_gt == {"car": 1, "person": 0, "dog": 0} and result.mean_ap == 1.0
    # a detection on a difficult box is neither a TP nor an FP
    gts2 = {"i1": _gt([A, B], ["car", "car"], [False, True])}
    assert evaluate_detections({"i1": _det([B, A], [0.9, 0.8], ["car", "car"])}, gts2).ap["car"] == 1.0
    with pytest.raises(ValueError, match="without ground truth"):
        evaluate_detections({"zz": _det([A], [0.5], ["car"])}, gts)
    ok = evaluate_detections({"zz": _det([A], [0.5], ["car"]), **dets}, gts, unknown_images="ignore")
    assert ok.mean_ap == 1.0
    with pytest.raises(ValueError, match="no class"):
        evaluate_detections({}, {"i1": _gt(np.zeros((0, 4)), [])})


def test_detections_csv_and_records(tmp_path) -> None:
    path = tmp_path / "dets.csv"
    pd.DataFrame({"image_id": ["i1", "i1", "007"], "label": ["car", "person", "car"], "score": [0.9, 0.8, 0.7],
                  "x1": [0, 20, 40], "y1": [0, 20, 0], "x2": [10, 30, 50], "y2": [10, 30, 10]}).to_csv(path, index=False)
    dets = detections_from_csv(path)
    assert set(dets) == {"i1", "007"} and list(dets["i1"].labels) == ["car", "person"]
    assert np.array_equal(dets["007"].boxes, np.array([C], np.float32))
    records = [ImageRecord(id="i1", lq=tmp_path / "i1.png", boxes=np.array([A, B]), labels=("car", "person"),
                           meta={"difficult": (False, False)}),
               ImageRecord(id="007", lq=tmp_path / "007.png", boxes=np.array([C]), labels=("car",)),
               ImageRecord(id="unannotated", lq=tmp_path / "u.png")]
    gts = ground_truths_from_records(records)
    assert set(gts) == {"i1", "007"}
    assert evaluate_detections(dets, gts).mean_ap == 1.0

    pd.DataFrame({"image_id": ["i1"], "label": ["car"], "score": [0.5]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad\.csv.*missing column"):
        detections_from_csv(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("image_id,label,score,x1,y1,x2,y2\ni1,car,high,0,0,1,1\n")
    with pytest.raises(ValueError, match="non-numeric"):
        detections_from_csv(tmp_path / "nan.csv")
    with pytest.raises(ValueError, match="x2 >= x1"):
        evaluate_detections({"i1": _det([[10, 0, 0, 10]], [0.5], ["car"])}, gts)


def _reference_voc_ap(dets: dict, gts: dict, cls: str, thr: float) -> float:
    """Plain VOC loop: detections of all images in global score order, one at a time."""
    rows = [(float(s), i, torch.as_tensor(b, dtype=torch.float32)) for i, d in dets.items()
            for b, s, lab in zip(d.boxes, d.scores, d.labels) if lab == cls]
    rows.sort(key=lambda r: -r[0])
    taken = {i: [False] * len(g.labels) for i, g in gts.items()}
    n_gt = sum(lab == cls for g in gts.values() for lab in g.labels)
    tp, fp = [], []
    for _, i, box in rows:
        g = gts[i]
        best, best_iou = -1, -1.0
        for k, (gb, lab) in enumerate(zip(g.boxes, g.labels)):
            if lab != cls:
                continue
            x1, y1 = max(box[0], gb[0]), max(box[1], gb[1])
            x2, y2 = min(box[2], gb[2]), min(box[3], gb[3])
            inter = max(float(x2 - x1), 0.0) * max(float(y2 - y1), 0.0)
            union = float((box[2] - box[0]) * (box[3] - box[1]) + (gb[2] - gb[0]) * (gb[3] - gb[1])) - inter
            if inter / union > best_iou:
                best, best_iou = k, inter / union
        ok = best_iou > thr and not taken[i][best]
        if ok:
            taken[i][best] = True
        tp.append(int(ok))
        fp.append(int(not ok))
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return average_precision(tp / n_gt, tp / np.maximum(tp + fp, 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matching_equals_plain_voc_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = ["car", "person"]

    def boxes(n: int) -> np.ndarray:
        xy = rng.uniform(0, 40, (n, 2))
        return np.concatenate([xy, xy + rng.uniform(5, 20, (n, 2))], axis=1).astype(np.float32)

    gts, dets = {}, {}
    for i in range(12):
        g = boxes(int(rng.integers(0, 5)))
        gts[f"im{i}"] = GroundTruth(g, list(rng.choice(classes, len(g))))
        # jittered copies of the objects (some twice) plus random boxes
        near = np.concatenate([g, g])[: int(rng.integers(0, 2 * len(g) + 1))]
        near = near + rng.normal(0, 2.0, near.shape).astype(np.float32)
        near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)
        d = np.concatenate([near, boxes(int(rng.integers(0, 4)))])
        dets[f"im{i}"] = Detections(d, rng.uniform(0, 1, len(d)), list(rng.choice(classes, len(d))))
    result = evaluate_detections(dets, gts, classes=classes)
    assert 0.0 < result.mean_ap < 1.0  # a mix of hits, duplicates and misses
    for cls in classes:
        assert result.ap[cls] == pytest.approx(_reference_voc_ap(dets, gts, cls, 0.5), abs=1e-9)
