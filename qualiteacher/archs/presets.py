"""Explicit catalogue of architecture sizes and the builders that use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from qualiteacher.archs.codebooks import DualCodebook, Fusion
from qualiteacher.archs.conditioning import CondMode, QualityConditioning
from qualiteacher.archs.fidelity import FidelityPath
from qualiteacher.archs.iqpir import IQPIRNet
from qualiteacher.archs.transformer import CodeTransformer
from qualiteacher.archs.unet import ConditionedUNet
from qualiteacher.archs.vqae import Decoder, Encoder, VQAutoencoder


@dataclass(frozen=True)
class ArchPreset:
    """Sizes of the IQPIR autoencoder, transformer and the plug-in U-Net."""

    resolution: int
    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    latent_channels: int
    codes_common: int
    codes_hq: int
    tf_layers: int
    tf_dim: int
    tf_heads: int
    tf_mlp: int
    unet_channels: int
    unet_mults: tuple[int, ...]
    unet_blocks: int
    n_levels: int = 8
    beta: float = 0.25
    hq_weight: float = 0.8
    fidelity_scales: tuple[int, ...] = ()  # decoder downscale factors with a fusion block (§5)
    image_fusion: bool = True  # the image-level fusion: a locally affine correction of the LQ image

    @property
    def latent_grid(self) -> int:
        return self.resolution // 2 ** (len(self.channel_mults) - 1)


PRESETS: dict[str, ArchPreset] = {
    # tests: 32 px -> 8x8 latent, tens of thousands of parameters
    "tiny": ArchPreset(
        resolution=32, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
        latent_channels=8, codes_common=32, codes_hq=32, tf_layers=1, tf_dim=16, tf_heads=2, tf_mlp=32,
        unet_channels=8, unet_mults=(1, 2), unet_blocks=1, fidelity_scales=(1, 2),
    ),
    # CPU demo: 48/64-px crops -> 12x12/16x16 tokens, 256 + 256 codes of width 32, fusion at every
    # decoder scale (full, 1/2, 1/4: the coarsest carries the global colour and haze correction)
    "demo": ArchPreset(
        resolution=64, base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
        latent_channels=32, codes_common=256, codes_hq=256, tf_layers=2, tf_dim=64, tf_heads=4, tf_mlp=128,
        unet_channels=16, unet_mults=(1, 2, 4), unet_blocks=1, fidelity_scales=(1, 2, 4),
    ),
    # CPU demo: 96 px -> 24x24 latent
    "base": ArchPreset(
        resolution=96, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
        latent_channels=32, codes_common=256, codes_hq=256, tf_layers=2, tf_dim=64, tf_heads=4, tf_mlp=128,
        unet_channels=16, unet_mults=(1, 2, 4), unet_blocks=1, fidelity_scales=(1, 2),
    ),
    # METHOD.md §5: 512 px, latent 16x16x256, 1024 + 1024 codes, 9 x d512 transformer
    "paper": ArchPreset(
        resolution=512, base_channels=64, channel_mults=(1, 2, 2, 4, 4, 8), num_res_blocks=2,
        attn_resolutions=(16,), latent_channels=256, codes_common=1024, codes_hq=1024, tf_layers=9,
        tf_dim=512, tf_heads=8, tf_mlp=1024, unet_channels=64, unet_mults=(1, 2, 4, 8), unet_blocks=2,
        fidelity_scales=(2, 4, 8, 16),  # 256, 128, 64 and 32 px of a 512-px input, as released
    ),
    # the paper path's CPU smoke run (tests/test_paper_smoke.py): the "paper" layout — 6 levels of
    # channel multipliers, 2 res blocks, attention at the latent grid, dual codebook, fusion at the
    # same scales, 9-layer transformer — at 64 px and 1/8 of the widths (2x2 latent, 1.4 M parameters)
    "paper-smoke": ArchPreset(
        resolution=64, base_channels=8, channel_mults=(1, 2, 2, 4, 4, 8), num_res_blocks=2,
        attn_resolutions=(2,), latent_channels=32, codes_common=64, codes_hq=64, tf_layers=9,
        tf_dim=32, tf_heads=8, tf_mlp=64, unet_channels=8, unet_mults=(1, 2, 4, 8), unet_blocks=2,
        fidelity_scales=(2, 4, 8, 16),
    ),
}


def list_presets() -> list[str]:
    """Names of the architecture presets."""
    return sorted(PRESETS)


def get_preset(name: str) -> ArchPreset:
    """The preset called ``name``; a clear error lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown architecture preset {name!r}; known: {', '.join(list_presets())}")
    return PRESETS[name]


def _codebook(p: ArchPreset, fusion: Fusion, hq_threshold: float) -> DualCodebook:
    return DualCodebook(p.codes_common, p.codes_hq, p.latent_channels, p.beta, p.hq_weight, hq_threshold, fusion)


def _encoder(p: ArchPreset) -> Encoder:
    return Encoder(3, p.base_channels, p.channel_mults, p.num_res_blocks, p.attn_resolutions, p.resolution, p.latent_channels)


def build_autoencoder(preset: str, fusion: Fusion = "add", hq_threshold: float = 0.70) -> VQAutoencoder:
    """Stage-1 VQ autoencoder of the given size."""
    p = get_preset(preset)
    decoder = Decoder(3, p.base_channels, p.channel_mults, p.num_res_blocks, p.attn_resolutions, p.resolution, p.latent_channels)
    return VQAutoencoder(_encoder(p), decoder, _codebook(p, fusion, hq_threshold))


def build_fidelity(p: ArchPreset, adain: bool = False, level_conditioned: bool = True,
                   prior: str | None = None) -> FidelityPath | None:
    """Fusion blocks at the preset's ``fidelity_scales`` (None when it has none); ``prior``: the
    classical restorer the image-level fusion reads beside the LQ image (``ImageFusion``)."""
    if not p.fidelity_scales:
        return None
    widths = {2 ** i: p.base_channels * m for i, m in enumerate(p.channel_mults)}
    return FidelityPath(p.fidelity_scales, widths, p.n_levels if level_conditioned else None, adain, p.image_fusion,
                        prior)


def build_iqpir(preset: str, cond_mode: CondMode = "add", fusion: Fusion = "add", hq_threshold: float = 0.70,
                adain: bool = False, default_w: float = 1.0, fidelity_conditioned: bool = True,
                prior: str | None = None) -> IQPIRNet:
    """IQPIR student of the given size (random weights; see ``init_from_stage1``).

    ``adain``, ``default_w``, ``fidelity_conditioned`` (a zero-initialised level embedding in
    each fusion block) and ``prior`` (a classical restorer read by the image-level fusion)
    configure the fidelity path when the preset has ``fidelity_scales``."""
    p = get_preset(preset)
    conditioning = QualityConditioning(cond_mode, p.n_levels, p.latent_channels, p.tf_dim)
    transformer = CodeTransformer(
        p.latent_channels, p.codes_common, p.codes_hq, p.tf_dim, p.tf_layers, p.tf_heads, p.tf_mlp,
        p.latent_grid, p.tf_dim if cond_mode == "adaln" else None,
    )
    ae = build_autoencoder(preset, fusion, hq_threshold)
    return IQPIRNet(_encoder(p), transformer, conditioning, ae.codebook, ae.decoder,
                    build_fidelity(p, adain, fidelity_conditioned, prior), default_w)


def build_unet(preset: str) -> ConditionedUNet:
    """Plug-in conditioned U-Net of the given size."""
    p = get_preset(preset)
    return ConditionedUNet(3, p.unet_channels, p.unet_mults, p.unet_blocks, p.n_levels)


class ParameterCount(NamedTuple):
    """Parameter counts: autoencoder (stage 1), iqpir (all), iqpir_trainable (LQ encoder,
    transformer, conditioning: what stages 2-3 train), unet."""

    autoencoder: int
    iqpir: int
    iqpir_trainable: int
    unet: int


def _numel(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def count_parameters(preset: str, cond_mode: CondMode = "add") -> ParameterCount:
    """Count parameters without allocating weights or running a forward pass (meta device)."""
    with torch.device("meta"):
        ae = build_autoencoder(preset)
        net = build_iqpir(preset, cond_mode)
        unet = build_unet(preset)
    return ParameterCount(
        _numel(ae), _numel(net), _numel(net.lq_encoder, net.transformer, net.conditioning, *([net.fidelity] if net.fidelity else [])),
        _numel(unet),
    )
