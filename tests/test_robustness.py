"""Scoring that survives any image (iqa/guards.py), bounded reads, a hostile folder scored and
restored with every bad file reported, stage 3 leaving unscorable candidates out, and tracking
failures that never end training."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from qualiteacher.cli import main
from qualiteacher.data.edge_cases import build_edge_case_folder, write_png_header_bomb
from qualiteacher.data.io import ImageReadError, read_image
from qualiteacher.iqa.guards import MemberDomain, fuse_available, guarded_scores


@pytest.fixture(scope="module")
def ensemble():
    from qualiteacher.iqa.presets import build_ensemble

    return build_ensemble("offline", task="dehaze")


def _texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.2 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def test_members_guard_their_domain(ensemble):
    flat = torch.full((1, 3, 64, 64), 0.5)
    s = ensemble(flat)
    # natural-scene statistics are undefined on a flat image: those members give their worst score
    assert s.raw["niqe"].item() == 25.0 and s.raw["brisque"].item() == 100.0 and s.raw["piqe"].item() == 100.0
    assert math.isfinite(s.fused.item()) and s.level.item() >= 0
    for name, x in {"1x1": torch.rand(1, 3, 1, 1), "nan": torch.full((1, 3, 64, 64), float("nan"))}.items():
        s = ensemble(x)
        assert math.isnan(s.fused.item()) and s.level.item() == -1, name  # unscorable, marked
        assert all(math.isnan(v.item()) for v in s.raw.values()), name
    strip = ensemble(_texture(8, 20000))
    for name in ("niqe", "brisque", "piqe"):  # never upsampled to 192 x 480000 px
        assert math.isnan(strip.raw[name].item()), name
    # the members that can judge a strip do; fused over them when they hold half the weight, else NaN
    assert torch.equal(strip.fused.isnan(), fuse_available(strip.normalized, ensemble.weights).isnan())
    assert (strip.level == -1).item() == math.isnan(strip.fused.item())


def test_one_bad_image_does_not_change_the_others(ensemble):
    good = _texture(64, 64, seed=3)
    alone = ensemble(good)
    mixed = ensemble(torch.cat([good, torch.full_like(good, 0.2), torch.full_like(good, float("nan"))]))
    assert torch.allclose(mixed.fused[0], alone.fused[0])
    for name in alone.raw:
        assert torch.allclose(mixed.raw[name][0], alone.raw[name][0]), name


def test_reward_stays_defined_with_gradients(ensemble):
    x = _texture(32, 32).repeat(2, 1, 1, 1).requires_grad_(True)
    flat = torch.full((1, 3, 32, 32), 0.5)
    r = ensemble.reward(torch.cat([x, flat, torch.full_like(flat, float("nan"))]))
    assert torch.isfinite(r).all() and r[3] == 0.0  # an output nobody can judge: the worst reward
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_a_member_that_fails_on_one_image_is_retried_per_image():
    calls = []

    def member(x):
        calls.append(x.shape[0])
        if (x.flatten(1).mean(1) > 0.8).any():
            raise RuntimeError("linalg.svd: non-finite values")
        return x.flatten(1).mean(1)

    images = torch.stack([torch.full((3, 16, 16), v) + 0.05 * torch.rand(3, 16, 16) for v in (0.2, 0.9, 0.4)])
    out = guarded_scores(member, images, MemberDomain(constant="score"), name="fake")
    assert calls == [3, 1, 1, 1]
    assert math.isnan(out[1]) and torch.allclose(out[[0, 2]], images[[0, 2]].flatten(1).mean(1))


def test_fusion_over_the_members_that_scored():
    w = {"a": 0.6, "b": 0.4}
    both = fuse_available({"a": torch.tensor([0.5]), "b": torch.tensor([1.0])}, w)
    assert torch.allclose(both, torch.tensor([0.7]))
    partial = fuse_available({"a": torch.tensor([0.5, float("nan")]), "b": torch.tensor([float("nan"), 1.0])}, w)
    assert partial[0] == 0.5 and math.isnan(partial[1])  # 0.4 < half the weight: unscorable


def test_pixel_cap_is_read_from_the_header(tmp_path, monkeypatch):
    bomb = write_png_header_bomb(tmp_path / "bomb.png", 12000, 12000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert bomb.stat().st_size < 50_000 and Image.open(bomb).size == (12000, 12000)
    with pytest.raises(ImageReadError, match=r"144\.0 MP exceeds the pixel cap of 64 MP"):
        read_image(bomb)
    monkeypatch.setenv("QUALITEACHER_MAX_PIXELS", "100")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 10, 3), np.uint8)).save(small)
    with pytest.raises(ImageReadError, match="pixel cap"):
        read_image(small)
    assert read_image(small, max_pixels=0).shape == (20, 10, 3)


def test_nan_float_image_is_refused(tmp_path):
    arr = np.full((8, 8), 0.5, np.float32)
    arr[2, 3] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        read_image(tmp_path / "nan.tif")


BAD = {"bomb_12000x12000.png": "pixel cap", "not_an_image.png": "not a recognised image format",
       "folder.png": "is a directory", "dangling.png": "dangling symbolic link"}


def test_hostile_folder_is_scored_and_restored(tmp_path, capsys, caplog):
    from test_safety import write_stage3_checkpoint

    folder = tmp_path / "bad"
    build_edge_case_folder(folder)
    from qualiteacher.data.io import get_skip_log

    get_skip_log().clear()
    out = tmp_path / "scores.csv"
    assert main(["score", str(folder), "--task", "dehaze", "--out", str(out), "--cache", str(tmp_path / "c.parquet")]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out).set_index("path")
    assert sorted(table.index) == ["flat.png", "normal.png", "one_pixel.png", "strip_20000x8.png"]
    assert table.loc[["normal.png", "flat.png"], "fused"].notna().all()
    assert np.isnan(table.loc["one_pixel.png", "fused"]) and table.loc["one_pixel.png", "level"] == -1
    assert table.loc["strip_20000x8.png", ["raw_niqe", "raw_brisque", "raw_piqe"]].isna().all()
    n_unscorable = int(table["fused"].isna().sum())
    assert f"unscorable (fused NaN, level -1): {n_unscorable}" in printed and "one_pixel.png: 1x1" in printed
    for name, reason in BAD.items():  # every bad file is named with its reason
        assert any(name in ln and reason in ln for ln in printed.splitlines()), name

    ckpt = write_stage3_checkpoint(tmp_path / "s3.ckpt")
    get_skip_log().clear()
    restored = tmp_path / "restored"
    assert main(["restore", str(folder), "--checkpoint", str(ckpt), "--out", str(restored)]) == 0
    printed = capsys.readouterr().out
    sizes = {p.name: Image.open(p).size for p in restored.glob("*.png")}
    assert sizes == {"normal.png": (48, 48), "flat.png": (48, 48), "one_pixel.png": (1, 1),
                     "strip_20000x8.png": (20000, 8)}
    assert "4 image(s) restored" in printed
    # restore checks the memory budget from the header first: the bomb is refused before reading
    for name, reason in {**BAD, "bomb_12000x12000.png": "over the memory budget"}.items():
        assert any(name in ln and reason in ln for ln in printed.splitlines()), name


def test_stage3_leaves_unscorable_candidates_out(fast_ensemble_factory):
    from torch import nn

    from qualiteacher.iqa.ensemble import EnsembleScores
    from qualiteacher.training.stage3 import QualiTeacherModule

    real = fast_ensemble_factory()

    class HalfUnscorable(nn.Module):
        """The real ensemble, with every other candidate unscorable (NaN), as a flat or NaN output would be."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = real

        def forward(self, images):
            s = self.inner(images)
            fused = s.fused.clone()
            fused[::2] = float("nan")
            return EnsembleScores(s.raw, s.normalized, fused, self.inner.level_of(fused))

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    module = QualiTeacherModule(student="unet", preset="tiny", ensemble=HalfUnscorable(), mask_block=16,
                                views=("identity", "hflip"), n_aug_variants=1)
    x = torch.rand(2, 3, 32, 32)
    fresh = module.refresh_pseudo_labels(x, ["a", "b"])
    n = 2 * 2 + 2  # 2 views x 2 images + 1 variant each
    assert fresh.logs["cand_unscorable"] == n // 2 and math.isfinite(fresh.logs["cand_score"])
    assert torch.isfinite(fresh.scores).all() and torch.isfinite(fresh.masks).all()
    assert torch.isfinite(module.bank.scores()).all() and len(module.bank.scores()) > 0


def test_metric_logging_failures_are_buffered_and_retried(caplog):
    from qualiteacher.tracking.mlflow_logger import MlflowStepLogger

    class FlakyClient:
        def __init__(self) -> None:
            self.down, self.written = True, []

        def get_metric_history(self, run_id, key):
            if self.down:
                raise ConnectionError("server down")
            return []

        def log_batch(self, run_id, metrics=(), params=()):
            if self.down:
                raise ConnectionError("server down")
            self.written += list(metrics)

    logger = MlflowStepLogger("http://127.0.0.1:9", "run", flush_every=2)
    logger._client = client = FlakyClient()
    for step in range(1, 6):
        logger.log_metrics({"loss": float(step)}, step=step)  # flushes at 2 and 4 fail: no exception
    assert client.written == [] and len(logger._buffer) == 5
    assert "training goes on" in caplog.text
    client.down = False
    logger.finalize("success")
    assert [m.step for m in client.written] == [1, 2, 3, 4, 5] and not logger._buffer
