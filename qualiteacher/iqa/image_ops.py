"""Small torch image operations shared by the destruction transforms and the colour members.

Pure functions on batches (B, 3, H, W) of RGB in [0, 1], batched and differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)  # Rec.601


def check_images(images: Tensor, who: str = "image operation") -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who} expects images (B, 3, H, W), got {tuple(images.shape)}")


def generator(seed: int) -> torch.Generator:
    """A CPU generator: random draws do not depend on the device or on the global RNG."""
    return torch.Generator().manual_seed(int(seed))


def luma(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) Rec.601 luma."""
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return (images * w[None, :, None, None]).sum(1, keepdim=True)


def opponent(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 2, H, W) opponent chroma ``rg = R - G``, ``yb = (R + G) / 2 - B``
    (Hasler & Süsstrunk's channels; both 0 on grey)."""
    r, g, b = images.unbind(1)
    return torch.stack([r - g, 0.5 * (r + g) - b], 1)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding (radius 3 sigma, at most the image side - 1)."""
    h, w = images.shape[-2:]
    r = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    ax = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, -1)
    c = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def scale_saturation(images: Tensor, factor: float | Tensor) -> Tensor:
    """Move every pixel away from (``factor`` > 1) or towards (< 1) its grey (luma), then clamp."""
    y = luma(images)
    if isinstance(factor, Tensor):
        factor = factor.view(-1, 1, 1, 1)
    return (y + factor * (images - y)).clamp(0, 1)


def rotate_hue(images: Tensor, degrees: float | Tensor) -> Tensor:
    """Rotate every pixel about the grey axis (1, 1, 1) by ``degrees`` (Rodrigues), then clamp:
    the channel mean stays, the chroma turns (``degrees`` per image as a (B,) tensor, or one)."""
    t = torch.as_tensor(degrees, dtype=images.dtype, device=images.device).reshape(-1) * (math.pi / 180)
    k = torch.full((3,), 1 / math.sqrt(3), dtype=images.dtype, device=images.device)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]],
                         dtype=images.dtype, device=images.device) / math.sqrt(3)  # [k]x
    eye = torch.eye(3, dtype=images.dtype, device=images.device)
    c, s = t.cos()[:, None, None], t.sin()[:, None, None]
    rot = c * eye + s * cross + (1 - c) * torch.outer(k, k)  # (B or 1, 3, 3)
    return torch.einsum("bij,bjhw->bihw", rot.expand(images.shape[0], 3, 3), images).clamp(0, 1)
