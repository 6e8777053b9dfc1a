"""Score cache: hits by content hash + ensemble version, bad files skipped, score_command."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qualiteacher.data.io import write_image
from qualiteacher.iqa.cache import file_sha1, score_command, score_folder
from qualiteacher.iqa.ensemble import Ensemble
from qualiteacher.iqa.members import MemberSpec, Normalization
from qualiteacher.iqa.presets import ensemble_from_specs




def _ensemble(weight: float = 1.0) -> Ensemble:
    return ensemble_from_specs([
        MemberSpec("contrast", "physical:contrast", weight, Normalization("range", 0, 0.3), True, True),
        MemberSpec("haze", "physical:haze_density", 1.0, Normalization("range", 0, 0.6), False, True),
    ])


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        write_image(root / f"a{i}.png", rng.random((32, 40, 3)).astype(np.float32))
    for i in range(2):
        write_image(root / "sub" / f"b{i}.png", rng.random((48, 48, 3)).astype(np.float32))
    (root / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def _count_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = Ensemble.forward

    def counting(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(Ensemble, "forward", counting)
    return calls


def test_second_run_hits_the_cache(folder: Path, tmp_path: Path, monkeypatch) -> None:
    calls = _count_calls(monkeypatch)
    ens = _ensemble()
    cache = tmp_path / "cache.parquet"
    first = score_folder(folder, ens, cache, batch_size=4)
    assert sorted(calls) == [1, 2, 4]  # grouped by size: 5 images of 32x40 (4 + 1), 2 of 48x48
    assert len(first) == 7 and set(first.attrs["skipped"]) == {str(folder / "broken.png")}
    assert {"path", "sha1", "version", "fused", "level", "raw_contrast", "norm_haze"} <= set(first.columns)
    calls.clear()
    second = score_folder(folder, ens, cache, batch_size=4)
    assert calls == []
    pd.testing.assert_frame_equal(first.reset_index(drop=True), second[first.columns].reset_index(drop=True),
                                  check_dtype=False)
    # a moved copy is recognised by content, a changed file is rescored
    shutil.copy(folder / "a0.png", folder / "sub" / "copy.png")
    write_image(folder / "a1.png", np.zeros((32, 40, 3), np.float32))
    third = score_folder(folder, ens, cache, batch_size=4)
    assert calls == [1] and len(third) == 8
    assert third.set_index("path").loc["sub/copy.png", "fused"] == pytest.approx(
        third.set_index("path").loc["a0.png", "fused"])
    assert third.set_index("path").loc["a1.png", "sha1"] == file_sha1(folder / "a1.png")


def test_new_ensemble_version_rescores(folder: Path, tmp_path: Path, monkeypatch) -> None:
    calls = _count_calls(monkeypatch)
    cache = tmp_path / "cache.parquet"
    score_folder(folder, _ensemble(1.0), cache)
    n_first = len(calls)
    score_folder(folder, _ensemble(2.0), cache)  # other weights -> other version
    assert len(calls) == 2 * n_first
    assert pd.read_parquet(cache)["version"].nunique() == 2


def test_resize_side_batches_mixed_sizes(folder: Path, tmp_path: Path, monkeypatch) -> None:
    calls = _count_calls(monkeypatch)
    table = score_folder(folder, _ensemble(), tmp_path / "c.parquet", batch_size=16, resize_side=32)
    assert calls == [5, 2]  # 32x40 and 32x32 after resizing the shorter side to 32
    assert set(table.height) == {32}


def test_score_command(folder: Path, tmp_path: Path, qt_home: Path) -> None:
    out = tmp_path / "scores.csv"
    table, summary = score_command(folder, "offline", "dehaze", out=out, cache=tmp_path / "c.parquet")
    assert out.is_file() and len(pd.read_csv(out)) == len(table) == 7
    assert "images scored: 7" in summary and "skipped (unreadable): 1" in summary
    assert "niqe" in summary and "levels:" in summary


def test_grading_an_empty_clean_folder_is_one_clear_error(tmp_path):
    from qualiteacher.errors import run_with_contract
    from qualiteacher.iqa.cache import grade_clean_images

    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "broken.png").write_bytes(b"not an image")  # reported by the reader and skipped
    with pytest.raises(FileNotFoundError, match="no readable clean images"):
        grade_clean_images(tmp_path / "gt", "dehaze", "offline", tmp_path / "cache.parquet")
    assert run_with_contract(lambda: grade_clean_images(tmp_path / "gt", "dehaze", "offline",
                                                        tmp_path / "cache.parquet")) == 2
