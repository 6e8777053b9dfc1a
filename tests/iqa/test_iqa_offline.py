"""Offline members: BRISQUE SVR conversion (checked against the brisque package), NIQE fitting,
physical members."""
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from qualiteacher.iqa import offline, physical
from qualiteacher.iqa.destruction import tile_seams

BRISQUE_ABS_TOL = 1e-6  # measured: max |ours - package| ~1e-11 on images without flat patches
# Images with exactly flat patches (low-quality JPEG blocks, clipped areas): the package's result
# depends on the rounding sign of MSCN ~ +-1e-12 there; we snap those to 0 (device-independent).
# Measured on 48 crops (4 photos x 3 sizes x clean/blur/noise/JPEG q20): Pearson 0.9993,
# Spearman 0.9999, 33/48 equal within 1e-6, max |diff| 6.3 points (a 64 px JPEG q20 crop).
BRISQUE_FLAT_ABS_TOL = 8.0




def _package_brisque(pkg, image_u8: np.ndarray) -> float:
    """The brisque package's own score, assembled from its pieces: its ``score`` raises a TypeError
    under numpy 2 (float() of 1-element arrays) -- we flatten the features before its SVR step."""
    import cv2
    import skimage.color

    grey = skimage.color.rgb2gray(image_u8)
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    feats = np.concatenate([pkg.calculate_brisque_features(grey, 7, 7 / 6),
                            pkg.calculate_brisque_features(half, 7, 7 / 6)])
    flat = np.array([np.ravel(np.asarray(f, dtype=float))[0] for f in feats])
    return float(pkg.calculate_image_quality_score(flat))


def test_brisque_matches_the_brisque_package(tmp_path: Path) -> None:
    brisque = pytest.importorskip("brisque")
    import skimage.data
    from scipy.ndimage import gaussian_filter

    path = offline.convert_brisque_package_svr(tmp_path / "svr.pth")
    params = torch.load(path, weights_only=True)
    assert params["sv"].shape == (770, 36) and params["gamma"] == 0.05
    member = offline.load_brisque_svr(path)
    rng = np.random.default_rng(0)
    base = skimage.data.chelsea()[40:105, 100:171]  # odd size on purpose (65 x 71)
    images = [base,
              np.clip(gaussian_filter(base.astype(float), (1.5, 1.5, 0)), 0, 255).astype(np.uint8),
              np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)]
    pkg = brisque.BRISQUE()
    expected = np.array([_package_brisque(pkg, im) for im in images])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255
    ours = member(x).numpy()
    print("package:", expected.round(4), "ours:", ours.round(4))
    np.testing.assert_allclose(ours, expected, atol=BRISQUE_ABS_TOL)
    assert expected[0] < expected[1] and expected[0] < expected[2]  # blur and noise score worse


def test_brisque_close_to_the_package_on_flat_jpeg_blocks(tmp_path: Path) -> None:
    brisque = pytest.importorskip("brisque")
    import cv2
    import skimage.data

    member = offline.load_brisque_svr(offline.convert_brisque_package_svr(tmp_path / "svr.pth"))
    pkg = brisque.BRISQUE()
    crops = [skimage.data.rocket()[100:164, 200:264], skimage.data.coffee()[50:114, 300:364]]
    jpegs = [cv2.imdecode(cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 20])[1], 1) for c in crops]
    expected = np.array([_package_brisque(pkg, im) for im in jpegs])
    ours = member(torch.from_numpy(np.stack(jpegs)).permute(0, 3, 1, 2).double() / 255).numpy()
    print("flat-block JPEG: package", expected.round(3), "ours", ours.round(3))
    np.testing.assert_allclose(ours, expected, atol=BRISQUE_FLAT_ABS_TOL)


def test_brisque_is_differentiable(tmp_path: Path) -> None:
    member = offline.load_brisque_svr(offline.convert_brisque_package_svr(tmp_path / "svr.pth"))
    x = torch.rand(2, 3, 32, 40, dtype=torch.float64, requires_grad=True)
    member(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_read_libsvm_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "model.txt"
    bad.write_text("svm_type c_svc\nkernel_type linear\nSV\n1 1:0.5\n")
    with pytest.raises(ValueError, match="epsilon_svr"):
        offline.read_libsvm_svr(bad)


def test_fit_niqe_writes_pyiqa_format(tmp_path: Path) -> None:
    from qualiteacher.data.io import write_image

    photos = offline.load_skimage_photos(["astronaut", "camera"])
    folder = tmp_path / "clean"
    folder.mkdir()
    for i, p in enumerate(photos):
        write_image(folder / f"{i}.png", p[:480, :480])
    (folder / "broken.png").write_bytes(b"not an image")
    out = offline.fit_niqe(folder, tmp_path / "niqe.mat")
    mat = scipy.io.loadmat(out)
    assert mat["mu_prisparam"].shape == (1, 36) and mat["cov_prisparam"].shape == (36, 36)
    assert np.allclose(mat["cov_prisparam"], mat["cov_prisparam"].T)
    assert int(mat["n_blocks"].squeeze()) == 2 * 25
    with pytest.raises(ValueError, match="need >= 96 px"):
        offline.fit_niqe([np.zeros((50, 50, 3), np.float32)], tmp_path / "x.mat")


def test_niqe_fit_photos_are_disjoint_from_held_out_ones() -> None:
    from qualiteacher.data.demo import HELD_OUT_PHOTOS as DEMO_TEST
    from qualiteacher.iqa.sanity import HELD_OUT_PHOTOS

    assert not set(offline.NIQE_FIT_PHOTOS) & set(DEMO_TEST)
    assert not set(offline.NIQE_FIT_PHOTOS) & set(HELD_OUT_PHOTOS)


def test_default_niqe_is_fitted_once_and_cached(qt_home: Path) -> None:
    first = offline.default_niqe_params()
    stamp = first.stat().st_mtime_ns
    assert offline.default_niqe_params() == first and first.stat().st_mtime_ns == stamp
    assert first.parent == qt_home / "iqa"


@pytest.mark.parametrize("metric", physical.list_physical_metrics())
def test_physical_members_batched_and_differentiable(metric: str) -> None:
    member = physical.PhysicalMember(metric)
    x = torch.rand(3, 3, 33, 47, requires_grad=True)
    out = member(x)
    assert out.shape == (3,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    single = torch.stack([member(x[i : i + 1].detach())[0] for i in range(3)])
    assert torch.allclose(single, out.detach(), atol=1e-5)  # batching does not mix images


def test_physical_members_directions() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 64, 64, generator=g) * 0.6 + 0.2
    hazy = 0.4 * img + 0.6 * 0.9
    assert physical.haze_density(hazy) > physical.haze_density(img)
    assert physical.exposure_quality(img) > physical.exposure_quality(img * 0.1)
    assert physical.rms_contrast(img) > physical.rms_contrast(hazy)
    assert physical.soft_entropy(img) > physical.soft_entropy(img * 0 + 0.5)
    streaks = img.clone()
    streaks[..., ::6] = 1.0  # vertical bright lines
    assert physical.rain_streak_density(streaks) > physical.rain_streak_density(img) + 0.2
    flakes = img.clone() * 0.5
    flakes[..., 10::12, 10::12] = 1.0  # isolated white dots
    assert physical.snow_flake_density(flakes) > physical.snow_flake_density(img * 0.5) + 0.005
    blocky = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(img, 8), scale_factor=8)
    assert physical.blockiness(blocky) > physical.blockiness(img) + 1.0
    with pytest.raises(ValueError, match="unknown physical metric"):
        physical.PhysicalMember("sharpness")


def test_seams_see_straight_tile_seams_not_natural_edges() -> None:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = torch.stack([0.5 + 0.2 * torch.sin(5 * xx + 3 * yy), 0.4 + 0.2 * torch.cos(4 * yy),
                          0.3 + 0.2 * xx * yy])[None]
    texture = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 66, 66, generator=g), 3, 1)
    img = (smooth + 0.3 * (texture - 0.5)).clamp(0, 1)  # a photo's texture over smooth shading
    edge = img.clone()
    edge[..., (xx + 0.3 * torch.sin(6 * yy)) > 0.5] *= 0.5  # a wavy natural edge across the image
    for seed in (0, 1):
        tiled = tile_seams(img, seed=seed)  # 3 x 3 tiles with their own gains: 2 straight seams a side
        assert physical.seams(tiled) > physical.seams(img) + 0.08
        assert physical.seams(tiled) > physical.seams(edge) + 0.08
    assert physical.seams(torch.full((1, 3, 16, 16), 0.5)) == 0  # nothing to see: no seam
