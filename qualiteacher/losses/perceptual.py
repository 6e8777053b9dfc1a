"""Optional VGG16 perceptual loss; its ImageNet weights must be available as a local file."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from qualiteacher.downloads import downloads_allowed

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name
DOWNLOAD_TIMEOUT_S = 30.0
# indices of relu1_2, relu2_2, relu3_3, relu4_3 in torchvision's vgg16().features
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}


def default_vgg16_path() -> Path:
    """Where torchvision keeps the VGG16 weights: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def load_vgg16_features(path: str | Path | None, allow_download: bool | None, last_index: int) -> nn.Sequential:
    """VGG16 feature layers ``0..last_index`` with ImageNet weights from ``path`` (full VGG16 or
    features-only state dict), else torchvision's cache, else a download if allowed (``None``:
    unless ``QUALITEACHER_OFFLINE`` / ``HF_HUB_OFFLINE`` is set)."""
    file = Path(path) if path is not None else default_vgg16_path()
    allow_download = downloads_allowed() if allow_download is None else allow_download
    if file.is_file():
        state = torch.load(file, map_location="cpu", weights_only=True)
    elif path is None and allow_download:
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            state = torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as err:  # offline: say exactly which file is missing
            raise FileNotFoundError(_missing(file, f"download failed: {type(err).__name__}: {err}")) from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    else:
        why = "file not found" if path is not None or allow_download else "file not found; downloads are disabled"
        raise FileNotFoundError(_missing(file, why))
    with torch.device("meta"):  # skip allocating the 120 M-parameter classifier
        features = torchvision.models.vgg16(weights=None).features[: last_index + 1]
    features = features.to_empty(device="cpu")
    wanted = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    expected = features.state_dict().keys()
    missing = [k for k in expected if k not in wanted]
    if missing:
        raise ValueError(f"{file} is not a VGG16 state dict: missing features.{missing[0]} (and {len(missing) - 1} more)")
    features.load_state_dict({k: wanted[k] for k in expected})
    return features


def _missing(file: Path, why: str) -> str:
    return (
        f"VGG16 weights for the perceptual loss are not available ({why}): expected {file}. "
        f"Download torchvision's {VGG16_FILE} (VGG16_Weights.IMAGENET1K_V1) on a machine with "
        f"internet and put it there, or give its path (pipeline: --stage1.model.perceptual_weights=PATH), "
        f"or turn the loss off (--stage1.model.w_perceptual=0)."
    )


class VGGPerceptualLoss(nn.Module):
    """Mean L1 distance between VGG16 features of two images in [0, 1]; frozen, eval mode.

    Weights come from ``weights`` (a local file) or torchvision's cache (downloaded when
    ``allow_download`` — by default unless downloads are disabled — and online); a clear
    FileNotFoundError names the file otherwise.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
        allow_download: bool | None = None,
    ) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown or not layers:
            raise ValueError(f"unknown VGG16 layers {unknown or layers}; choose from {list(VGG16_LAYERS)}")
        self.taps = sorted(VGG16_LAYERS[name] for name in layers)
        self.features = load_vgg16_features(weights, allow_download, self.taps[-1])
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        return super().train(False)  # frozen network: always eval

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        x = (torch.cat([pred, target]) - self.mean) / self.std  # one pass for both images
        loss = pred.new_zeros(())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                a, b = x.chunk(2)
                loss = loss + F.l1_loss(a, b)
        return loss / len(self.taps)
