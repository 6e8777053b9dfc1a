"""The only module that imports pyiqa (PolyForm-Noncommercial-1.0.0 licence boundary).

Weight files: ``pyiqa_weights.METRIC_WEIGHT_FILES`` lists every file a metric loads with its default
configuration and where pyiqa (or torchvision / timm) looks for it. Before building a metric we check
that each file is in that place, and hand pyiqa the local path of the files it takes as an argument,
so pyiqa itself never downloads. A missing file is downloaded into that place unless downloads are
disabled (``QUALITEACHER_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``); a disabled or failed download raises
one ``MissingWeightsError`` naming the file and where to put it. ``pyiqa_weights.metric_available``
answers the same question without building anything.

pyiqa (2 s) and huggingface_hub are imported inside the functions that use them: every
``qualiteacher.iqa`` import loads this module, and most never build a pyiqa metric; huggingface_hub
reads its environment (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``) once, when first imported.

Every weight file pyiqa reads is read with ``weights_only=True`` (``checkpoints.weights_only_loads``,
although pyiqa itself passes ``weights_only=False``): a crafted file that would run code when
unpickled is refused with one ``CheckpointError`` line naming it.

``DEFAULT_MIN_SIZE`` gives each metric's smallest input side; the ensemble upsamples smaller images.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.checkpoints import weights_only_loads
from qualiteacher.iqa.fast_features import FastBrisque, FastNiqe
from qualiteacher.iqa.members import MissingWeightsError, downloads_allowed
from qualiteacher.iqa.pyiqa_weights import (
    METRIC_WEIGHT_FILES,
    WeightFile,
    primary_weight_file,
    pyiqa_weights_dir,
    weight_file_path,
)

# create_metric keywords that build a metric without its own checkpoint (tests only: random scores)
_RANDOM_INIT_KWARGS: dict[str, dict[str, object]] = {
    "piqe": {},
    "entropy": {},
    "cnniqa": {"pretrained": None},
    "musiq": {"pretrained": False},
    "nima": {"pretrained": False},
    "topiq_nr": {"pretrained": False},
    "hyperiqa": {"pretrained": False},
    "maniqa": {"pretrained": False},
    "dbcnn": {"pretrained": False},
}
# smallest input side each metric handles sensibly (NIQE: two 96 px blocks per side; HyperIQA and
# MANIQA: 224 px crops)
DEFAULT_MIN_SIZE: dict[str, int] = {
    "niqe": 192, "piqe": 32, "brisque": 32, "musiq": 32, "cnniqa": 32, "clipiqa": 32, "nima": 32,
    "topiq_nr": 32, "dbcnn": 32, "hyperiqa": 224, "maniqa": 224,
}
DOWNLOAD_TIMEOUT_S = 30.0
OFFLINE_HINT = (
    "Without internet use the offline preset instead: build_ensemble('offline', task=...) / "
    "`qualiteacher score DIR --preset offline`."
)
DISABLED_NOTE = "Downloads are disabled (QUALITEACHER_OFFLINE/HF_HUB_OFFLINE)."


def _download_url(file: WeightFile) -> str:
    if file.store == "pyiqa":
        from pyiqa.archs.arch_util import get_url_from_name  # lazy: pyiqa, see the module doc

        return get_url_from_name(file.name)
    return file.source


def _download(file: WeightFile, path: Path) -> Path:
    if file.store == "hf":
        from huggingface_hub import hf_hub_download  # lazy: see the module doc

        return Path(hf_hub_download(file.source, file.name))
    if file.store == "pyiqa":
        from pyiqa.utils.download_util import load_file_from_url  # lazy: pyiqa, see the module doc

        return Path(load_file_from_url(_download_url(file), model_dir=str(path.parent)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(file.source, str(path))
    return path


_REACHABLE: dict[tuple[str, int], tuple[bool, str]] = {}  # (host, port) -> answer, once per process
PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def host_reachable(url: str) -> tuple[bool, str]:
    """Whether ``url``'s host accepts a TCP connection within ``PROBE_TIMEOUT_S`` seconds, asked
    once per host and process (a machine without network learns it once per run, in seconds, not
    from one download timeout per file). Behind a proxy the answer is always yes (the proxy decides)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True, ""
    parsed = urlparse(url)
    if not parsed.hostname:
        return True, ""
    where = (parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443))
    if where not in _REACHABLE:
        try:
            socket.create_connection(where, timeout=PROBE_TIMEOUT_S).close()
            _REACHABLE[where] = (True, "")
        except OSError as err:
            _REACHABLE[where] = (False, f"{where[0]} is not reachable ({type(err).__name__}: {err}; "
                                        f"checked once for this run)")
    return _REACHABLE[where]


def _source_url(file: WeightFile) -> str:
    if file.store == "hf":
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _download_url(file)


def _fetch(member: str, file: WeightFile, allow_download: bool, offline_hint: str) -> Path:
    path = weight_file_path(file)
    if path.is_file():
        return path
    label, how = file.name, ""
    if file.store == "hf":
        label = f"{file.source}/{file.name}"
        how = f"It lives in the Hugging Face cache: fetch it with `hf download {file.source} {file.name}`. "
    if not allow_download:
        raise MissingWeightsError(member, label, str(path), f"{how}{DISABLED_NOTE} {offline_hint}")
    reachable, why = host_reachable(_source_url(file))
    if not reachable:
        raise MissingWeightsError(member, label, str(path), f"{how}Not downloaded: {why}. {offline_hint}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return _download(file, path)
    except Exception as err:  # urllib / requests / hub errors all mean "not available"
        hint = f"Download failed ({type(err).__name__}: {err}). {offline_hint}"
        raise MissingWeightsError(member, label, str(path), hint) from err
    finally:
        socket.setdefaulttimeout(old_timeout)


def resolve_metric_kwargs(
    member: str,
    metric: str,
    weights_path: str | None,
    allow_download: bool,
    pretrained: bool = True,
    offline_hint: str = OFFLINE_HINT,
) -> dict[str, str]:
    """Make every file ``metric`` loads local (downloading if allowed); return the ``create_metric``
    keywords that pass pyiqa the paths. ``weights_path`` replaces the metric's keyword file."""
    primary = primary_weight_file(metric)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(member, path.name, str(path), "The preset names this file explicitly.")
        if metric in METRIC_WEIGHT_FILES and primary is None:
            raise ValueError(f"member {member!r}: {metric!r} takes no weights_path")
    if metric not in METRIC_WEIGHT_FILES:
        # not in the table: only an explicit file, or pyiqa's own download when that is allowed
        if weights_path is not None:
            return {"pretrained_model_path": str(path)}
        if allow_download:
            return {}
        raise MissingWeightsError(
            member, f"<weights of {metric}>", str(pyiqa_weights_dir()),
            f"{DISABLED_NOTE} {metric!r} is not in METRIC_WEIGHT_FILES, so its files cannot be checked "
            f"offline. {offline_hint}",
        )
    kwargs: dict[str, str] = {}
    for file in METRIC_WEIGHT_FILES[metric]:
        if file.checkpoint and not pretrained:
            continue
        if file is primary and weights_path is not None:
            kwargs[file.kwarg] = str(path)
            continue
        local = _fetch(member, file, allow_download, offline_hint)
        if file.kwarg is not None:
            kwargs[file.kwarg] = str(local)
    return kwargs


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Keep timm's Hugging Face look-ups in the local cache while a metric is built offline
    (huggingface_hub reads ``HF_HUB_OFFLINE`` once at import; its request hook checks the constant)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants  # lazy: see the module doc

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


class PyiqaMember(nn.Module):
    """A built pyiqa network as a plain (B, 3, H, W) -> (B,) raw score module."""

    def __init__(self, net: nn.Module, metric: str, min_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.metric = metric
        self.min_size = DEFAULT_MIN_SIZE.get(metric, 0) if min_size is None else int(min_size)
        # NIQE / BRISQUE: our float32 batched implementation with this net's parameters
        self.fast_net = fast_equivalent(net, metric)
        self.fast = self.fast_net is not None
        # learned networks may run in bf16 + channels_last (Ensemble.low_precision); statistics may not
        self.tolerates_bf16 = metric not in ("niqe", "brisque", "piqe", "entropy", "ilniqe")

    def forward(self, images: Tensor) -> Tensor:
        if self.fast and self.fast_net is not None:
            return self.fast_net(images).reshape(-1).float()
        out = self.net(images)
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(images.shape[0], -1)[:, 0].float()


def fast_equivalent(net: nn.Module, metric: str) -> nn.Module | None:
    """Our float32 batched NIQE / BRISQUE (``fast_features.py``) holding ``net``'s parameters, when
    ``net`` is pyiqa's NIQE or BRISQUE ('original' version) in its default configuration; else None."""
    if metric == "niqe" and getattr(net, "test_y_channel", False) and getattr(net, "color_space", "") == "yiq" \
            and getattr(net, "crop_border", 1) == 0 and hasattr(net, "mu_pris_param"):
        return FastNiqe(net.mu_pris_param, net.cov_pris_param)
    if metric == "brisque" and getattr(net, "version", "") == "original" and getattr(net, "kernel_size", 0) == 7 \
            and abs(getattr(net, "kernel_sigma", 0.0) - 7 / 6) < 1e-12 and getattr(net, "test_y_channel", False):
        lo, hi = _brisque_feature_ranges()
        return FastBrisque(net.sv, net.sv_coef.reshape(-1), net.gamma, net.rho, lo, hi, recipe="pyiqa")
    return None


def _brisque_feature_ranges() -> tuple[Tensor, Tensor]:
    # pyiqa scales features linearly to [-1, 1] with fixed ranges: read them off two evaluations
    from pyiqa.archs.brisque_arch import scale_features  # lazy: pyiqa, see the module doc

    zero = scale_features(torch.zeros(1, 36, dtype=torch.float64))[0]
    slope = scale_features(torch.ones(1, 36, dtype=torch.float64))[0] - zero   # 2 / (hi - lo)
    lo = -(zero + 1) / slope
    return lo, lo + 2 / slope


def build_pyiqa_member(
    metric: str,
    member_name: str,
    weights_path: str | None = None,
    min_size: int | None = None,
    allow_download: bool | None = None,
    pretrained: bool = True,
    offline_hint: str = OFFLINE_HINT,
) -> PyiqaMember:
    """Resolve the weights (see the module doc), build the pyiqa metric, wrap it.

    ``pretrained=False`` builds the metric without its own checkpoint (random weights, for tests;
    backbones are still loaded). ``offline_hint`` ends the message of a ``MissingWeightsError``.
    """
    import pyiqa  # lazy: pyiqa takes 2 s to import, see the module doc

    if metric not in pyiqa.list_models(metric_mode="NR"):
        raise ValueError(f"member {member_name!r}: {metric!r} is not a no-reference pyiqa metric")
    if not pretrained and metric not in _RANDOM_INIT_KWARGS:
        raise ValueError(f"member {member_name!r}: {metric!r} cannot be built without its weights")
    allow = downloads_allowed() if allow_download is None else allow_download
    kwargs: dict[str, object] = dict(
        resolve_metric_kwargs(member_name, metric, weights_path, allow, pretrained, offline_hint)
    )
    if not pretrained:
        kwargs.update(_RANDOM_INIT_KWARGS[metric])
    # pyiqa reads its weight files with weights_only=False: inside this block every torch.load
    # reads tensors and plain data only, and a file holding code is refused before it runs
    with _hub_offline(not allow), weights_only_loads():
        net = pyiqa.create_metric(metric, as_loss=True, loss_reduction="none", device="cpu", **kwargs).net
    return PyiqaMember(net.eval(), metric, min_size)


def niqe_block_features(image: Tensor, block_size: int = 96) -> tuple[Tensor, Tensor]:
    """pyiqa's NIQE features of every ``block_size`` block of one RGB image (1, 3, H, W) in [0, 1].

    Returns ``(features (N, 36), sharpness (N,))``; sharpness is the block's mean local deviation.
    """
    from pyiqa.archs.func_util import diff_round, normalize_img_with_gauss  # lazy: pyiqa, see the module doc
    from pyiqa.archs.niqe_arch import compute_feature  # lazy: pyiqa, see the module doc
    from pyiqa.matlab_utils import blockproc, imresize  # lazy: pyiqa, see the module doc
    from pyiqa.utils.color_util import to_y_channel  # lazy: pyiqa, see the module doc

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
