from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qualiteacher.data.degradations import DEGRADATIONS, params_from_dict
from qualiteacher.data.demo import (
    HELD_OUT_PHOTOS,
    SPLITS,
    TASKS,
    build_demo,
    grace_hopper_path,
    load_photos,
    read_manifest,
    summarize_manifest,
    unseen_photos,
)
from qualiteacher.data.io import read_image

SMALL = {"size": 48, "n_labeled": 4, "n_unlabeled": 4, "n_test": 2, "n_clean": 3, "n_val": 2, "n_unseen": 3,
         "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, tuple[Path, pd.DataFrame]]:
    out = {}
    for name, seed, tasks in [("a", 0, TASKS), ("b", 0, TASKS), ("c", 1, ("dehaze", "lowlight"))]:
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, build_demo(root, seed=seed, tasks=tasks, **SMALL))
    return out


def test_same_seed_gives_identical_bytes(builds):
    (root_a, _), (root_b, _) = builds["a"], builds["b"]
    files_a, files_b = _files(root_a), _files(root_b)
    assert files_a.keys() == files_b.keys() and len(files_a) > 50
    assert all(files_a[k] == files_b[k] for k in files_a)
    pd.testing.assert_frame_equal(read_manifest(root_a / "manifest.csv"), read_manifest(root_b / "manifest.csv"))


def test_task_subset_and_other_seed(builds):
    (root_a, _), (root_c, df_c) = builds["a"], builds["c"]
    files_a, files_c = _files(root_a), _files(root_c)
    assert set(df_c["task"]) == {"clean", "dehaze", "lowlight"}
    shared = [k for k in files_c if k != "manifest.csv"]
    assert set(shared) <= set(files_a)
    differ = sum(files_a[k] != files_c[k] for k in shared)
    assert differ == len(shared)  # another seed: other crops and parameters for every file


def test_layout_matches_design(builds):
    root, df = builds["a"]
    for task in TASKS:
        for pair in ("labeled", "test", "val", "unseen"):
            lq = sorted(p.name for p in (root / task / pair / "lq").iterdir())
            gt = sorted(p.name for p in (root / task / pair / "gt").iterdir())
            assert lq == gt and len(lq) == SMALL[f"n_{pair}"]
        names = sorted(p.name for p in (root / task / "unlabeled").glob("*.png"))
        assert names == [f"{i:04d}.png" for i in range(SMALL["n_unlabeled"])]
    assert len(list((root / "clean").glob("*.png"))) == SMALL["n_clean"]
    # the manifest lists every image file, and only those
    listed = set(df["path"]) | set(df["gt_path"][df["gt_path"] != ""])
    on_disk = {k for k in _files(root) if k.endswith(".png")}
    assert listed == on_disk
    img = read_image(root / df["path"].iloc[-1])
    assert img.shape == (48, 48, 3)


def test_manifest_columns_and_domains(builds):
    _, df = builds["a"]
    assert list(df["split"].unique()) == ["clean", "labeled", "unlabeled", "oracle", "test", "val", "unseen"]
    assert set(df.loc[df["split"] == "labeled", "domain"]) == {"source"}
    assert set(df.loc[df["split"].isin(["unlabeled", "oracle", "test", "val", "unseen"]), "domain"]) == {"real"}
    for deg in DEGRADATIONS.values():
        rows = df[df["task"] == deg.task]
        for field in deg.params_type.__dataclass_fields__:
            assert rows[field].notna().all(), (deg.task, field)
    width, height = df["crop_x1"] - df["crop_x0"], df["crop_y1"] - df["crop_y0"]
    assert (width > 0).all() and (width == height).all()
    assert set(df.loc[df["photo"] == "motorcycle", "depth_source"]) <= {"disparity"}


def test_domain_gap_in_manifest(builds):
    _, df = builds["a"]
    for task, deg in DEGRADATIONS.items():
        rows = df[df["task"] == task]
        src = rows.loc[rows["domain"] == "source", deg.main_param]
        real = rows.loc[rows["split"] == "unlabeled", deg.main_param]
        if task == "lowlight":
            assert real.mean() < src.mean()
        else:
            assert real.mean() > src.mean()
        assert (rows.loc[rows["domain"] == "real", "jpeg_quality"] > 0).all()
        assert (rows.loc[rows["domain"] == "source", "jpeg_quality"] == 0).all()


def test_test_photos_are_held_out(builds):
    _, df = builds["a"]
    test_photos = set(df.loc[df["split"] == "test", "photo"])
    other_photos = set(df.loc[df["split"] != "test", "photo"])
    assert test_photos <= set(HELD_OUT_PHOTOS)
    assert test_photos.isdisjoint(other_photos)
    assert set(df.loc[df["split"] == "val", "photo"]).isdisjoint(HELD_OUT_PHOTOS)  # choosing on val never sees test photos


def test_manifest_parameters_reproduce_images(builds):
    # low light needs no depth map: the recorded parameters rebuild the lq file from its gt exactly
    root, df = builds["a"]
    deg = DEGRADATIONS["lowlight"]
    for _, row in df[(df["task"] == "lowlight") & (df["gt_path"] != "")].iterrows():
        params = params_from_dict("lowlight", row.to_dict())
        assert isinstance(params.seed, int) and isinstance(params.jpeg_quality, int)
        lq = deg.apply(read_image(root / row["gt_path"]), params)
        np.testing.assert_array_equal(np.round(lq * 255), np.round(read_image(root / row["path"]) * 255))


def test_summary_and_manifest_reader(builds, tmp_path):
    root, df = builds["a"]
    text = summarize_manifest(df)
    for task in TASKS:
        assert task in text
    assert "beta" in text and "exposure" in text
    df2 = read_manifest(root / "manifest.csv")
    assert (df2.loc[df2["split"] == "unlabeled", "gt_path"] == "").all()
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path / "nope.csv")


def test_existing_output_needs_overwrite(tmp_path):
    kwargs = SMALL | {"tasks": ("derain",), "n_labeled": 1, "n_unlabeled": 1, "n_test": 1, "n_clean": 1}
    build_demo(tmp_path, **kwargs)
    (tmp_path / "derain" / "unlabeled" / "stale.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_demo(tmp_path, **kwargs)
    build_demo(tmp_path, overwrite=True, **kwargs)
    assert not (tmp_path / "derain" / "unlabeled" / "stale.png").exists()
    with pytest.raises(ValueError, match="unknown demo task"):
        build_demo(tmp_path / "x", tasks=("deblur",), **SMALL)


def test_bundled_photos():
    photos = load_photos()
    assert set(HELD_OUT_PHOTOS) <= set(photos)
    assert "motorcycle" in photos and photos["motorcycle"].depth_source == "disparity"
    assert ("grace_hopper" in photos) == (grace_hopper_path() is not None)
    for p in photos.values():
        assert p.image.dtype == np.uint8 and p.image.ndim == 3 and p.image.shape[2] == 3
        assert p.depth.shape == p.image.shape[:2] and 0.0 <= p.depth.min() and p.depth.max() <= 1.0
    assert len(photos) - len(HELD_OUT_PHOTOS) >= 8


def test_val_split_leaves_the_other_splits_unchanged(builds, tmp_path):
    # the val split is drawn after the others: a build without it has the same bytes everywhere else
    root_a, _ = builds["a"]
    without = build_demo(tmp_path, seed=0, tasks=("dehaze",), **{**SMALL, "n_val": 0})
    assert "val" not in set(without["split"])
    files = _files(tmp_path)
    shared = [k for k in files if k != "manifest.csv"]
    assert len(shared) > 10 and all(files[k] == _files(root_a)[k] for k in shared)
    assert (root_a / "dehaze" / "val" / "lq" / "0000.png").is_file()


def test_unseen_split_is_cut_from_photos_no_other_split_uses(builds, tmp_path):
    root, df = builds["a"]
    unseen = df[df["split"] == "unseen"]
    assert set(unseen["task"]) == set(TASKS) and (unseen.groupby("task").size() == SMALL["n_unseen"]).all()
    assert set(unseen["photo"]).isdisjoint(df.loc[df["split"] != "unseen", "photo"])
    photos = unseen_photos(list(load_photos()))
    assert len(photos) >= 8 and set(photos).isdisjoint(load_photos())  # gradio and pyiqa ship most of them
    assert max(max(p.image.shape[:2]) for p in photos.values()) <= 640
    # its own draw: a build without it (or with more of it) leaves every other file's bytes
    without = build_demo(tmp_path / "none", seed=0, tasks=("dehaze",), **{**SMALL, "n_unseen": 0})
    more = build_demo(tmp_path / "more", seed=0, tasks=("dehaze",), **{**SMALL, "n_unseen": 5})
    assert "unseen" not in set(without["split"]) and (more["split"] == "unseen").sum() == 5
    files_a, files_more = _files(root), _files(tmp_path / "more")
    shared = [k for k in _files(tmp_path / "none") if k != "manifest.csv"]
    assert len(shared) > 10 and all(files_a[k] == files_more[k] for k in shared)
    assert set(SPLITS) == {"labeled", "unlabeled", "test", "val"}
