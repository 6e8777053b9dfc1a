"""The only module that imports pyiqa (PolyForm-Noncommercial-1.0.0 licence boundary).

Weight files: pyiqa keeps them in ``$TORCH_HOME/hub/pyiqa/<file>``. Before building a metric we look
for the file there (or at the member's ``weights_path``) and hand pyiqa the local path, so pyiqa
itself never downloads. If the file is missing we download it with pyiqa's downloader unless
downloads are disabled (``QUALITEACHER_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``); a disabled or failed
download raises one ``MissingWeightsError`` naming the file and where to put it.

``DEFAULT_MIN_SIZE`` gives each metric's smallest input side; the ensemble upsamples smaller images.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.iqa.members import MissingWeightsError, downloads_allowed

# metric -> (pyiqa arch module, key of its ``default_model_urls``) for the default weights
_WEIGHT_URL_KEYS: dict[str, tuple[str, str]] = {
    "musiq": ("musiq_arch", "koniq10k"),
    "brisque": ("brisque_arch", "url"),
    "niqe": ("niqe_arch", "url"),
}
# smallest input side each metric handles sensibly (NIQE: two 96 px blocks per side)
DEFAULT_MIN_SIZE: dict[str, int] = {"niqe": 192, "piqe": 32, "brisque": 32, "musiq": 32}
NO_WEIGHTS_METRICS = ("piqe", "entropy")
DOWNLOAD_TIMEOUT_S = 30.0
OFFLINE_HINT = (
    "Without internet use the offline preset instead: build_ensemble('offline', task=...) / "
    "`qualiteacher score DIR --preset offline`."
)


def pyiqa_weights_dir() -> Path:
    """``$TORCH_HOME/hub/pyiqa`` (read at call time)."""
    return Path(torch.hub.get_dir()) / "pyiqa"


def default_weight_url(metric: str) -> str | None:
    """URL of pyiqa's default weight file for ``metric`` (None when it needs none / is unknown)."""
    if metric not in _WEIGHT_URL_KEYS:
        return None
    import importlib

    module_name, key = _WEIGHT_URL_KEYS[metric]
    module = importlib.import_module(f"pyiqa.archs.{module_name}")
    return module.default_model_urls[key]


def default_weight_file(metric: str) -> str | None:
    url = default_weight_url(metric)
    return None if url is None else os.path.basename(url.split("?")[0])


def resolve_weights(member: str, metric: str, weights_path: str | None, allow_download: bool) -> str | None:
    """Local path of the weights of a pyiqa metric, downloading them if allowed."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(member, path.name, str(path), "The preset names this file explicitly.")
        return str(path)
    file_name = default_weight_file(metric)
    if file_name is None:
        return None
    cached = pyiqa_weights_dir() / file_name
    if cached.is_file():
        return str(cached)
    hint = OFFLINE_HINT
    if allow_download:
        from pyiqa.utils.download_util import load_file_from_url

        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            return load_file_from_url(default_weight_url(metric), model_dir=str(cached.parent))
        except Exception as err:  # urllib / requests / hub errors all mean "not available"
            hint = f"Download failed ({type(err).__name__}: {err}). {OFFLINE_HINT}"
        finally:
            socket.setdefaulttimeout(old_timeout)
    else:
        hint = f"Downloads are disabled (QUALITEACHER_OFFLINE/HF_HUB_OFFLINE). {OFFLINE_HINT}"
    raise MissingWeightsError(member, file_name, str(cached), hint)


class PyiqaMember(nn.Module):
    """A built pyiqa network as a plain (B, 3, H, W) -> (B,) raw score module."""

    def __init__(self, net: nn.Module, metric: str, min_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.metric = metric
        self.min_size = DEFAULT_MIN_SIZE.get(metric, 0) if min_size is None else int(min_size)

    def forward(self, images: Tensor) -> Tensor:
        out = self.net(images)
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(images.shape[0], -1)[:, 0].float()


def build_pyiqa_member(
    metric: str,
    member_name: str,
    weights_path: str | None = None,
    min_size: int | None = None,
    allow_download: bool | None = None,
    pretrained: bool = True,
) -> PyiqaMember:
    """Resolve the weights (see the module doc), build the pyiqa metric, wrap it."""
    import pyiqa

    if metric not in pyiqa.list_models(metric_mode="NR"):
        raise ValueError(f"member {member_name!r}: {metric!r} is not a no-reference pyiqa metric")
    allow = downloads_allowed() if allow_download is None else allow_download
    kwargs: dict[str, object] = {}
    if pretrained:
        path = resolve_weights(member_name, metric, weights_path, allow)
        if path is not None:
            kwargs["pretrained_model_path"] = path
    else:
        kwargs["pretrained"] = False
    net = pyiqa.create_metric(metric, as_loss=True, loss_reduction="none", device="cpu", **kwargs).net
    return PyiqaMember(net.eval(), metric, min_size)


def niqe_block_features(image: Tensor, block_size: int = 96) -> tuple[Tensor, Tensor]:
    """pyiqa's NIQE features of every ``block_size`` block of one RGB image (1, 3, H, W) in [0, 1].

    Returns ``(features (N, 36), sharpness (N,))``; sharpness is the block's mean local deviation.
    """
    from pyiqa.archs.func_util import diff_round, normalize_img_with_gauss
    from pyiqa.archs.niqe_arch import compute_feature
    from pyiqa.matlab_utils import blockproc, imresize
    from pyiqa.utils.color_util import to_y_channel

    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"niqe_block_features expects (1, 3, H, W), got {tuple(image.shape)}")
    y = diff_round(to_y_channel(image, 255, "yiq")).to(torch.float64)
    nh, nw = y.shape[-2] // block_size, y.shape[-1] // block_size
    y = y[..., : nh * block_size, : nw * block_size]
    feats = []
    for scale in (1, 2):
        normed = normalize_img_with_gauss(y, padding="replicate")
        feats.append(blockproc(normed, [block_size // scale] * 2, fun=compute_feature)[0])
        if scale == 1:
            sharp_map = _local_deviation(y)
            y = imresize(y / 255.0, scale=0.5, antialiasing=True) * 255.0
    sharp = F.avg_pool2d(sharp_map, block_size)[0, 0]  # (nh, nw)
    return torch.cat(feats, dim=-1).float(), sharp.t().reshape(-1).float()  # blockproc: column-major


def _local_deviation(y: Tensor, size: int = 7, sigma: float = 7 / 6) -> Tensor:
    ax = torch.arange(size, dtype=y.dtype) - size // 2
    g = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    g = (g / g.sum())[None, None].to(y)
    pad = F.pad(y, (size // 2,) * 4, mode="replicate")
    mu = F.conv2d(pad, g)
    return (F.conv2d(pad * pad, g) - mu * mu).abs().sqrt()
