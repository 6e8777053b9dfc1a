"""IQPIR's fidelity path (METHOD.md §5): SFT-style fusion of LQ encoder features into the decoder.

At a few decoder scales ``dec ← dec + w · (dec ⊙ scale + shift)``, where ``scale`` and ``shift``
are small conv nets applied to a residual block of ``concat(enc, dec)``. ``w = 0`` is the pure
codebook prior, ``w = 1`` the most faithful output. The encoder features arrive detached (the
fusion never trains the encoder). Optional AdaIN re-normalises the quantised latent to the channel
statistics of the LQ feature (keeps colour and illumination).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from qualiteacher.archs.conditioning import LevelEmbedding
from qualiteacher.archs.vqae import ResBlock
from qualiteacher.classical import classical_method


def _conv_pair(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(ch, ch, 3, padding=1))


def fidelity_weight(w: float | Tensor, batch: int, like: Tensor) -> Tensor | float:
    """``w`` as a python float or a (B, 1, 1, 1) tensor broadcastable against ``like`` (B, C, H, W)."""
    if isinstance(w, Tensor):
        if w.ndim == 0:
            return w.to(like.dtype)
        if w.shape != (batch,):
            raise ValueError(f"fidelity w must be a float or a ({batch},) tensor, got shape {tuple(w.shape)}")
        return w.to(like.dtype).view(-1, 1, 1, 1)
    return float(w)


def is_zero(w: float | Tensor) -> bool:
    """True when ``w`` is exactly zero everywhere (the pure-prior path can skip the fusion)."""
    return bool((w == 0).all()) if isinstance(w, Tensor) else float(w) == 0.0


class FidelityFusion(nn.Module):
    """One fusion block at one decoder scale.

    ``forward(enc, dec, w, level)``: enc (B, Ce, H, W) LQ encoder feature (detached by the caller),
    dec (B, Cd, H, W) decoder feature. With ``n_levels`` set, a zero-initialised level embedding is
    added to the block's hidden feature (the plug-in quality conditioning of §5 applied to the
    fidelity path), so ``level=None`` and an untrained embedding leave the block unconditioned.
    """

    def __init__(self, enc_channels: int, dec_channels: int, n_levels: int | None = None) -> None:
        super().__init__()
        self.block = ResBlock(enc_channels + dec_channels, dec_channels)
        self.scale = _conv_pair(dec_channels)
        self.shift = _conv_pair(dec_channels)
        self.level_embedding = LevelEmbedding(n_levels, dec_channels) if n_levels else None

    def forward(self, enc: Tensor, dec: Tensor, w: float | Tensor, level: Tensor | None = None) -> Tensor:
        h = self.block(torch.cat([enc, dec], dim=1))
        if self.level_embedding is not None:
            h = self.level_embedding(h, level)
        return dec + fidelity_weight(w, dec.shape[0], dec) * (dec * self.scale(h) + self.shift(h))


class ImageFusionResult(NamedTuple):
    """The image-level fusion's parts. image: (B, 3, H, W) the blend; corrected: (B, 3, H, W) the
    locally affine correction of the LQ image; gate: (B, 1, H, W) its share in the blend (before ``w``)."""

    image: Tensor
    corrected: Tensor
    gate: Tensor


class ImageContext(NamedTuple):
    """What the image-level fusion reads of a whole image, per image: the classical prior's
    statistics (``{"airlight": (B, 3)}`` for ``dcp``; empty for a local prior) and the mean hidden
    feature ``vector`` (B, width; None: each batch's own). A tile restored with its image's context
    is restored as part of that image (see :func:`qualiteacher.archs.context.image_context`); a
    training crop gets its image's prior statistics (:func:`~qualiteacher.archs.context.fixed_prior_statistics`)."""

    prior: dict[str, Tensor]
    vector: Tensor | None


class ImageFusion(nn.Module):
    """Image-level fidelity: a locally affine correction of the LQ image, blended with the decode.

    Haze (``J = (I - A) / t + A``), low light (``J = I / T``) and colour casts are per-pixel affine
    maps of the input that vary slowly across the image. This block predicts, at the decoder scale
    ``factor``, a 3x3 colour matrix, a bias and a gate logit per position (13 channels, from a small
    stem on the LQ image, the detached encoder feature and the decoder feature of that scale, plus
    a global context vector for the airlight / exposure), upsamples them bilinearly to full size and
    returns ``decode + w * g * (M x + b - decode)``. Zero-initialised: ``M = I``, ``b = 0``,
    ``g = 0.5``. The colour of the output therefore starts as the colour of its input, which the
    codebook prior (a few hundred codes learnt from few photos) cannot carry; ``w = 0`` still
    gives the pure prior. With ``n_levels`` a zero-initialised level embedding conditions it.

    ``prior`` names a classical restorer (``qualiteacher.classical``, e.g. ``dcp`` for haze, ``lime``
    for low light). Its output ``p`` (computed from the LQ image, no gradient) is a second input of
    the stem, and the affine map is applied to ``x + a * (p - x)`` with a per-pixel share ``a``
    (a 14th channel, 0.5 at initialisation) instead of ``x``: the network learns where to trust
    the prior, which knows nothing of the training domain (synthetic haze is grey and thin; real
    haze is dense and tinted) and so transfers where a map learnt from synthetic pairs does not.

    Two inputs are statistics of the whole image: the global context vector and the prior's own
    (the dark channel prior's airlight). Restoring in tiles, each tile would measure its own and
    the tiles would disagree (a hazy tile and a clear one get different airlights: blocks in the
    output). :func:`~qualiteacher.archs.context.image_context` measures them once on the whole image (``recording``) and
    fixes them (``fixed``) for the tiles; neither is a weight (nothing enters the state dict).
    """

    def __init__(self, factor: int, enc_channels: int, dec_channels: int, width: int = 24,
                 n_levels: int | None = None, prior: str | None = None) -> None:
        super().__init__()
        self.factor = factor
        self.prior = prior or None
        self.prior_fn, self.prior_statistics = None, None
        if self.prior is not None:
            method = classical_method(self.prior)  # checked here: an unknown name fails at build
            self.prior_fn, self.prior_statistics = method.fn, method.statistics
        self.recording = False                  # store the context of the next forward in `recorded`
        self.recorded: ImageContext | None = None
        self.fixed: ImageContext | None = None  # the whole image's context, used instead of the batch's
        stem: list[nn.Module] = [nn.Conv2d(6 if self.prior else 3, width, 3, padding=1), nn.SiLU()]
        for _ in range(max(factor.bit_length() - 1, 0)):  # log2(factor) stride-2 steps
            stem += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU()]
        self.stem = nn.Sequential(*stem)
        self.block = ResBlock(width + enc_channels + dec_channels, width)
        self.context = nn.Linear(width, width)
        self.level_embedding = LevelEmbedding(n_levels, width) if n_levels else None
        self.head = nn.Conv2d(width, 14 if self.prior else 13, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, enc: Tensor, dec: Tensor, decoded: Tensor, w: float | Tensor,
                level: Tensor | None = None) -> ImageFusionResult:
        size = enc.shape[-2:]
        fixed, reps = self.fixed, 1
        if fixed is not None:
            n = fixed.vector.shape[0] if fixed.vector is not None else next(iter(fixed.prior.values())).shape[0]
            if x.shape[0] % n:
                raise ValueError(f"a fixed image context of {n} image(s) cannot serve a batch of {x.shape[0]}")
            reps = x.shape[0] // n  # tiles arrive position after position
        prior, stats = None, {}
        if self.prior is not None:
            with torch.no_grad():
                if fixed is not None:
                    stats = {k: v.repeat(reps, *[1] * (v.ndim - 1)) for k, v in fixed.prior.items()}
                elif self.prior_statistics is not None:
                    stats = self.prior_statistics(x.float())
                prior = self.prior_fn(x.float(), **stats).to(x.dtype)
        stem = self.stem(x if prior is None else torch.cat([x, prior], dim=1))
        if stem.shape[-2:] != size:  # odd sizes: the encoder rounds differently
            stem = torch.nn.functional.interpolate(stem, size=size, mode="bilinear", align_corners=False)
        h = self.block(torch.cat([stem, enc, dec], dim=1))  # (B, width, H/f, W/f)
        vector = h.mean((-2, -1)) if fixed is None or fixed.vector is None else fixed.vector.to(h.dtype).repeat(reps, 1)
        if self.recording:
            self.recorded = ImageContext({k: v.detach() for k, v in stats.items()}, vector.detach())
        h = h + self.context(vector)[..., None, None]  # global: airlight, exposure
        if self.level_embedding is not None:
            h = self.level_embedding(h, level)
        coeffs = torch.nn.functional.interpolate(self.head(torch.nn.functional.silu(h)), size=x.shape[-2:],
                                                 mode="bilinear", align_corners=False)  # (B, 13, H, W)
        b, _, hh, ww = x.shape
        base = x if prior is None else x + torch.sigmoid(coeffs[:, 13:14]) * (prior - x)
        matrix = coeffs[:, :9].view(b, 3, 3, hh, ww) + torch.eye(3, device=x.device, dtype=x.dtype)[None, :, :, None, None]
        corrected = torch.einsum("bijhw,bjhw->bihw", matrix, base) + coeffs[:, 9:12]
        gate = torch.sigmoid(coeffs[:, 12:13])
        image = decoded + fidelity_weight(w, b, decoded) * gate * (corrected - decoded)
        return ImageFusionResult(image, corrected, gate)


class FidelityPath(nn.Module):
    """The fusion blocks of every configured scale (keys: downscale factors relative to the input).

    ``scales`` are downscale factors (1 = full resolution, 2 = half …); the released IQPIR fuses at
    32, 64, 128 and 256 px of a 512-px input, i.e. factors 16, 8, 4, 2. ``channels[f]`` gives the
    (equal) encoder and decoder width at factor ``f``.
    """

    def __init__(self, scales: tuple[int, ...], channels: Mapping[int, int], n_levels: int | None = None,
                 adain: bool = False, image_fusion: bool = False, prior: str | None = None) -> None:
        super().__init__()
        unknown = [s for s in scales if s not in channels]
        if unknown:
            raise ValueError(f"fidelity scales {unknown} are not decoder scales; available: {sorted(channels)}")
        self.scales = tuple(sorted(set(scales)))
        self.blocks = nn.ModuleDict({str(s): FidelityFusion(channels[s], channels[s], n_levels) for s in self.scales})
        self.adain = adain
        # the image-level fusion reads the coarsest fused scale (the widest context)
        coarsest = max(self.scales) if self.scales else 1
        self.image: ImageFusion | None = (
            ImageFusion(coarsest, channels[coarsest], channels[coarsest], n_levels=n_levels, prior=prior)
            if image_fusion and self.scales else None
        )

    def fuse(self, factor: int, dec: Tensor, skips: Mapping[int, Tensor], w: float | Tensor,
             level: Tensor | None) -> Tensor:
        """Apply the block of ``factor`` (if any) to the decoder feature ``dec``."""
        key = str(factor)
        if key not in self.blocks:
            return dec
        return self.blocks[key](skips[factor], dec, w, level)


def adain(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """Re-normalise ``content`` (B, C, H, W) to the per-channel mean and std of ``style``."""
    c_mean, c_std = content.mean((-2, -1), keepdim=True), content.std((-2, -1), keepdim=True) + eps
    s_mean, s_std = style.mean((-2, -1), keepdim=True), style.std((-2, -1), keepdim=True) + eps
    return (content - c_mean) / c_std * s_std + s_mean
