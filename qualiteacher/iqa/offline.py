"""IQA members that run with no download.

BRISQUE: the LIVE-trained epsilon-SVR shipped by the ``brisque`` PyPI package (Apache-2.0;
``brisque/models/svm.txt`` + ``normalize.pickle``) is converted once into
``$QUALITEACHER_HOME/iqa/brisque_svr_livepkg.pth`` and evaluated on features computed in torch with
the package's own recipe (skimage grey, MSCN with a zero-padded 7x7 Gaussian, cropped pair products,
AGGD moment fit, OpenCV-style bicubic half-scale), so our score matches the package's score
(to ~1e-11; on exactly flat patches the package's result depends on the rounding sign of MSCN
values ~1e-12, which we snap to 0 -- see docs/iqa.md for the measured agreement). pyiqa's BRISQUE
cannot hold this SVR: it hard-codes rho (-153.591) and the feature ranges of the MATLAB model,
while the package's SVR has rho -155.845 and its own ranges.

NIQE: ``fit_niqe`` fits pristine statistics (mu 1x36, cov 36x36) with pyiqa's NIQE feature code on
clean images and writes the ``.mat`` pyiqa's NIQE loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.data.io import ImageReadError, read_image
from qualiteacher.iqa.fast_features import FastNiqe, brisque_package_features, niqe_features, opencv_half, solve_shape
from qualiteacher.iqa.pyiqa_adapter import niqe_block_features
from qualiteacher.say import say

NIQE_FIT_PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "camera", "brick", "grass", "gravel")
BRISQUE_SVR_FILE = "brisque_svr_livepkg.pth"
NIQE_PARAMS_FILE = "niqe_pristine_skimage_b96.mat"
_GREY = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray
_FLAT_MSCN = 1e-9


def qualiteacher_home() -> Path:
    """Project cache root: ``$QUALITEACHER_HOME`` or ``~/.cache/qualiteacher``."""
    return Path(os.environ.get("QUALITEACHER_HOME", Path.home() / ".cache" / "qualiteacher"))


# ----------------------------------------------------------------------------------------- BRISQUE
def _brisque_package_dir() -> Path:
    spec = importlib.util.find_spec("brisque")
    if spec is None or spec.origin is None:
        raise ImportError("the offline BRISQUE member needs the `brisque` package: pip install brisque")
    return Path(spec.origin).parent / "models"


def read_libsvm_svr(svm_path: Path) -> dict[str, Tensor | float]:
    """Parse a libsvm text model (epsilon-SVR, RBF) into support vectors, coefficients, gamma, rho."""
    header: dict[str, str] = {}
    coefs: list[float] = []
    rows: list[dict[int, float]] = []
    lines = Path(svm_path).read_text().splitlines()
    try:
        start = lines.index("SV") + 1
    except ValueError as err:
        raise ValueError(f"{svm_path}: not a libsvm model (no 'SV' line)") from err
    for line in lines[: start - 1]:
        key, _, value = line.partition(" ")
        header[key] = value
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(f"{svm_path}: expected an epsilon_svr with rbf kernel, got {header}")
    for line in lines[start:]:
        if not line.strip():
            continue
        first, *pairs = line.split()
        coefs.append(float(first))
        rows.append({int(k): float(v) for k, v in (p.split(":") for p in pairs)})
    dim = max(max(r) for r in rows)
    sv = torch.zeros(len(rows), dim, dtype=torch.float64)
    for i, row in enumerate(rows):
        for k, v in row.items():
            sv[i, k - 1] = v
    return {
        "sv": sv,
        "sv_coef": torch.tensor(coefs, dtype=torch.float64),
        "gamma": float(header["gamma"]),
        "rho": float(header["rho"]),
    }


def convert_brisque_package_svr(out_path: str | Path | None = None) -> Path:
    """Convert the ``brisque`` package's SVR + feature ranges into one torch file (idempotent)."""
    out = Path(out_path) if out_path else qualiteacher_home() / "iqa" / BRISQUE_SVR_FILE
    if out.exists():
        return out
    models = _brisque_package_dir()
    params = read_libsvm_svr(models / "svm.txt")
    with open(models / "normalize.pickle", "rb") as fh:
        ranges = pickle.load(fh)
    params["feature_min"] = torch.tensor([float(v) for v in ranges["min_"]], dtype=torch.float64)
    params["feature_max"] = torch.tensor([float(v) for v in ranges["max_"]], dtype=torch.float64)
    params["source_sha1"] = hashlib.sha1((models / "svm.txt").read_bytes()).hexdigest()
    if params["feature_min"].numel() != params["sv"].shape[1]:
        raise ValueError(f"{models}: feature ranges do not match the SVR dimension")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(params, tmp)
    tmp.replace(out)
    return out


def _gaussian_1d(size: int = 7, sigma: float = 7 / 6) -> Tensor:
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return g / g.sum()


def _blur_same(x: Tensor, g: Tensor) -> Tensor:
    """Zero-padded 'same' convolution with the separable window ``g g^T`` (scipy convolve2d 'same')."""
    r = g.numel() // 2
    x = F.conv2d(x, g.view(1, 1, -1, 1), padding=(r, 0))
    return F.conv2d(x, g.view(1, 1, 1, -1), padding=(0, r))


def _solve_alpha(r_big: Tensor, iters: int = 60) -> Tensor:
    """Solve phi(alpha) = R for alpha in [e^-6, e^6] (``fast_features.solve_shape``); R is clamped
    to (1e-6, 0.7499) in value only, so its gradient passes as the brisque package's fit implies."""
    r_clamped = r_big + (r_big.detach().clamp(1e-6, 0.7499) - r_big.detach())
    return solve_shape(r_clamped, math.exp(-6), math.exp(6), iters=iters)


def _aggd_features(x: Tensor, with_mean: bool) -> list[Tensor]:
    """Moment-matching AGGD fit of (B, N) samples, as the brisque package does it."""
    neg = (x < 0).to(x.dtype)
    pos = 1 - neg
    sq = x * x
    left = (sq * neg).sum(1) / neg.sum(1).clamp_min(1)
    right = (sq * pos).sum(1) / pos.sum(1).clamp_min(1)
    r_hat = x.abs().mean(1) ** 2 / sq.mean(1).clamp_min(1e-20)
    gam = left.clamp_min(1e-20).sqrt() / right.clamp_min(1e-20).sqrt()
    r_big = r_hat * (gam**3 + 1) * (gam + 1) / (gam**2 + 1) ** 2
    alpha = _solve_alpha(r_big)
    sigma_l, sigma_r = left.clamp_min(1e-20).sqrt(), right.clamp_min(1e-20).sqrt()
    if not with_mean:
        return [alpha, (left + right) / 2]
    constant = torch.exp((torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)) / 2)
    mean = (sigma_r - sigma_l) * constant * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
    return [alpha, mean, left, right]


def _scale_features(grey: Tensor) -> Tensor:
    """18 BRISQUE features of a (B, 1, H, W) float64 grey image in [0, 1]."""
    g = _gaussian_1d().to(grey)
    mu = _blur_same(grey, g)
    dev = (_blur_same(grey * grey, g) - mu * mu).abs().clamp_min(1e-20).sqrt()
    m = ((grey - mu) / (dev + 1 / 255))[:, 0]  # (B, H, W)
    # flat patches give MSCN of +-1e-12 rounding noise whose sign would decide the AGGD side: snap
    # them to 0 (counted as >= 0) so the features do not depend on the convolution's rounding
    m = torch.where(m.abs() < _FLAT_MSCN, torch.zeros_like(m), m)
    b = m.shape[0]
    pairs = [
        m,
        m[:, :, :-1] * m[:, :, 1:],
        m[:, :-1, :] * m[:, 1:, :],
        m[:, :-1, :-1] * m[:, 1:, 1:],
        m[:, 1:, :-1] * m[:, :-1, 1:],
    ]
    feats: list[Tensor] = []
    for i, p in enumerate(pairs):
        feats += _aggd_features(p.reshape(b, -1), with_mean=i > 0)
    return torch.stack(feats, dim=1)


def brisque_features(images: Tensor) -> Tensor:
    """36 BRISQUE features (B, 36) of RGB images (B, 3, H, W) in [0, 1], float64."""
    x = images.to(torch.float64)
    grey = (x * torch.tensor(_GREY, dtype=x.dtype, device=x.device)[None, :, None, None]).sum(1, True)
    half = opencv_half(grey)
    return torch.cat([_scale_features(grey), _scale_features(half)], dim=1)


class BrisqueSVR(nn.Module):
    """BRISQUE score (B,) of the ``brisque`` package's LIVE SVR; lower = better, differentiable."""

    min_size = 32

    def __init__(self, params: dict[str, Tensor | float]) -> None:
        super().__init__()
        for key in ("sv", "sv_coef", "feature_min", "feature_max"):
            self.register_buffer(key, params[key].to(torch.float64), persistent=False)
        self.gamma = float(params["gamma"])
        self.rho = float(params["rho"])
        self.fast = True  # float32 input: the batched float32 features of fast_features.py

    def forward(self, images: Tensor) -> Tensor:
        if self.fast and images.dtype != torch.float64:
            feats = brisque_package_features(images).double()
        else:  # float64 input (or fast off): this module's exact float64 recipe
            feats = brisque_features(images)
        scaled = -1 + 2 * (feats - self.feature_min) / (self.feature_max - self.feature_min)
        dist = torch.cdist(scaled, self.sv.to(scaled)).pow(2)  # (B, nSV)
        score = torch.exp(-self.gamma * dist) @ self.sv_coef.to(scaled) - self.rho
        return score.to(images.dtype)


def load_brisque_svr(path: str | Path | None = None) -> BrisqueSVR:
    """The converted SVR at ``path`` (default: convert the ``brisque`` package's model on first use)."""
    path = Path(path) if path else convert_brisque_package_svr()
    if not path.is_file():
        raise FileNotFoundError(f"BRISQUE SVR file not found: {path} (see convert_brisque_package_svr)")
    return BrisqueSVR(torch.load(path, map_location="cpu", weights_only=True))


# -------------------------------------------------------------------------------------------- NIQE
def load_skimage_photos(names: Sequence[str]) -> list[np.ndarray]:
    """Clean photos that ship with scikit-image, as float32 RGB (H, W, 3) in [0, 1]."""
    out = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no image {name!r}")
        img = np.asarray(loader())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(img[..., :3].astype(np.float32) / 255.0)
    return out


def _iter_images(source: str | Path | Iterable[np.ndarray]) -> list[np.ndarray]:
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise NotADirectoryError(f"fit_niqe: {folder} is not a folder of clean images")
        images = []
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}:
                try:
                    images.append(read_image(path))
                except ImageReadError as err:
                    say(f"fit_niqe: skipped {path}: {err}", "quiet")
        return images
    return [np.asarray(img, dtype=np.float32) for img in source]


def fit_niqe(
    folder_or_images: str | Path | Iterable[np.ndarray],
    out_path: str | Path,
    block_size: int = 96,
    sharpness_fraction: float = 0.0,
) -> Path:
    """Fit NIQE pristine statistics on clean images and write pyiqa's ``.mat`` format.

    Every image (float RGB (H, W, 3) in [0, 1], at least 2 blocks on a side) is cut into
    ``block_size`` blocks; pyiqa's NIQE features (36 per block, two scales) give
    ``mu_prisparam`` (1, 36) and ``cov_prisparam`` (36, 36). ``sharpness_fraction`` > 0 keeps only
    blocks whose mean local deviation exceeds that fraction of the image's sharpest block (the
    original NIQE selection uses 0.75).
    """
    import scipy.io  # lazy: scipy.io (0.2 s) only where a NIQE model is written or read

    feats = []
    for i, img in enumerate(_iter_images(folder_or_images)):
        if img.ndim != 3 or min(img.shape[:2]) < block_size:
            raise ValueError(f"fit_niqe: image {i} has shape {img.shape}, need >= {block_size} px")
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].float()
        f, sharp = niqe_block_features(x, block_size)  # (N, 36), (N,)
        keep = sharp >= sharpness_fraction * sharp.max()
        feats.append(f[keep])
    if not feats:
        raise ValueError(f"fit_niqe: no images found in {folder_or_images}")
    all_feats = torch.cat(feats).double()
    all_feats = all_feats[torch.isfinite(all_feats).all(1)]
    if all_feats.shape[0] < 40:
        raise ValueError(f"fit_niqe: only {all_feats.shape[0]} clean blocks; need >= 40 (36 features)")
    mu = all_feats.mean(0, keepdim=True).numpy()
    cov = np.cov(all_feats.numpy(), rowvar=False)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(out, {"mu_prisparam": mu, "cov_prisparam": cov, "n_blocks": all_feats.shape[0]})
    return out


def default_niqe_params() -> Path:
    """The offline preset's NIQE model: fitted once on ``NIQE_FIT_PHOTOS`` and cached."""
    out = qualiteacher_home() / "iqa" / NIQE_PARAMS_FILE
    if not out.exists():
        tmp = out.with_name(out.stem + f".{os.getpid()}.mat")
        fit_niqe(load_skimage_photos(NIQE_FIT_PHOTOS), tmp)
        tmp.replace(out)
    return out


NATIVE_FIT_SIDES: tuple[int, ...] = (96, 128, 192)


def niqe_pristine(block: int) -> tuple[Tensor, Tensor]:
    """Pristine NIQE model ``(mu (36,), cov (36, 36))`` for ``block``-px blocks (native-size grading).

    96 px: the offline preset's model (``default_niqe_params``). Smaller blocks: fitted once with
    the float32 features of ``fast_features`` on ``NIQE_FIT_PHOTOS`` rescaled to short sides of
    ``NATIVE_FIT_SIDES`` px (the scale of small crops), cached in ``$QUALITEACHER_HOME/iqa``.
    """
    import scipy.io  # lazy: scipy.io, see fit_niqe

    path = default_niqe_params() if block == 96 else qualiteacher_home() / "iqa" / f"niqe_pristine_native_b{block}.mat"
    if not path.exists():
        feats = []
        for img in load_skimage_photos(NIQE_FIT_PHOTOS):
            x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
            for side in NATIVE_FIT_SIDES:
                y = F.interpolate(x, scale_factor=side / min(x.shape[-2:]), mode="bilinear",
                                  antialias=True, align_corners=False).clamp(0, 1)
                f = niqe_features(y, block).reshape(-1, 36)
                feats.append(f[torch.isfinite(f).all(1)])
        all_feats = torch.cat(feats).double()
        if all_feats.shape[0] < 40:
            raise ValueError(f"niqe_pristine: only {all_feats.shape[0]} clean {block}-px blocks")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".{os.getpid()}.mat")
        scipy.io.savemat(tmp, {"mu_prisparam": all_feats.mean(0, keepdim=True).numpy(),
                               "cov_prisparam": np.cov(all_feats.numpy(), rowvar=False),
                               "n_blocks": all_feats.shape[0]})
        tmp.replace(path)
    mat = scipy.io.loadmat(str(path))
    return torch.from_numpy(np.ravel(mat["mu_prisparam"])), torch.from_numpy(mat["cov_prisparam"])


def native_niqe_member(weights_path: str | None = None) -> nn.Module:
    """The offline NIQE member grading every image at its own size (``options: {native: true}``):
    no upsampling of small crops, blocks and pristine model follow the image (``niqe_pristine``)."""
    import scipy.io  # lazy: scipy.io, see fit_niqe

    if weights_path is not None:
        mat = scipy.io.loadmat(str(weights_path))
        mu, cov = torch.from_numpy(np.ravel(mat["mu_prisparam"])), torch.from_numpy(mat["cov_prisparam"])
    else:
        mu, cov = niqe_pristine(96)
    return FastNiqe(mu, cov, 96, pristine_for=niqe_pristine)
