"""IQPIR student: LQ encoder -> quality-conditioned code transformer -> frozen codebooks + decoder."""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.archs.codebooks import DualCodebook
from qualiteacher.archs.conditioning import QualityConditioning
from qualiteacher.archs.fidelity import FidelityPath, adain, is_zero
from qualiteacher.archs.output import StudentOutput
from qualiteacher.archs.quantize import VectorQuantizer
from qualiteacher.archs.transformer import CodeTransformer
from qualiteacher.archs.vqae import Decoder, Encoder, VQAutoencoder


class IQPIRResult(NamedTuple):
    """Full IQPIR result.

    image: (B, 3, H, W). logits_common, logits_hq: (B, h, w, K). feature: (B, C, h, w) LQ encoder
    output before conditioning (the stage-2 MSE input). latent: (B, C, h, w) straight-through fused
    latent fed to the decoder (its values are codebook entries). corrected: (B, 3, H, W) the
    image-level fusion's affine correction of the input (``None`` without one, or at ``w = 0``).
    """

    image: Tensor
    logits_common: Tensor
    logits_hq: Tensor
    feature: Tensor
    latent: Tensor
    corrected: Tensor | None = None


def straight_through_codes(logits: Tensor, quantizer: VectorQuantizer) -> Tensor:
    """Hard codes (argmax lookup) in the forward pass, gradients of the soft codes
    ``softmax(logits) @ codebook`` in the backward pass: ``f + (q - f).detach()``. (B,h,w,K) -> (B,C,h,w)."""
    probs = logits.float().softmax(dim=-1).to(quantizer.embedding.weight.dtype)
    soft = quantizer.codes_from_probs(probs)
    hard = quantizer.codes_from_indices(logits.argmax(dim=-1))
    return soft + (hard - soft).detach()


class IQPIRNet(nn.Module):
    """Quality-conditioned codebook student with a fidelity path.

    ``forward(x, level, w=None) -> StudentOutput``; ``level`` (B,) long in 0..n_levels-1 or ``None``
    (unconditioned); ``w`` the fidelity weight (float or (B,) tensor; ``None``: ``default_w``):
    ``w = 0`` decodes the codebook prior alone, ``w = 1`` fuses the LQ encoder's (detached)
    features at full strength (METHOD.md §5). Inputs of any size are replicate-padded to a multiple
    of the encoder's downscale (at least twice it) and the output is cropped back. ``aux_loss`` is
    a zero tensor: the code-prediction losses need ground-truth codes and live in stage 2, and stage 3 trains this net
    through the straight-through path with its own losses.

    Build with :func:`qualiteacher.archs.presets.build_iqpir`; load the stage-1 prior (encoder copy,
    decoder, codebooks) and freeze it with :func:`init_from_stage1`.
    """

    def __init__(
        self,
        lq_encoder: Encoder,
        transformer: CodeTransformer,
        conditioning: QualityConditioning,
        codebook: DualCodebook,
        decoder: Decoder,
        fidelity: FidelityPath | None = None,
        default_w: float = 1.0,
    ) -> None:
        super().__init__()
        self.lq_encoder = lq_encoder
        self.transformer = transformer
        self.conditioning = conditioning
        self.codebook = codebook
        self.decoder = decoder
        self.fidelity = fidelity
        self.default_w = float(default_w)
        self.downscale = lq_encoder.downscale

    @property
    def has_fidelity(self) -> bool:
        """True when the net has fusion blocks (a ``w`` dial)."""
        return self.fidelity is not None and len(self.fidelity.blocks) > 0

    @property
    def size_multiple(self) -> int:
        """Input sizes that need no padding are multiples of this."""
        return self.downscale

    def forward(self, x: Tensor, level: Tensor | None, w: float | Tensor | None = None) -> StudentOutput:
        image = self.predict(x, level, w).image
        return StudentOutput(image, image.new_zeros(()))

    def predict(self, x: Tensor, level: Tensor | None, w: float | Tensor | None = None) -> IQPIRResult:
        """Like ``forward`` with logits, encoder feature and decoder latent."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"IQPIRNet expects images (B, 3, H, W), got {tuple(x.shape)}")
        w = self.default_w if w is None else w
        h, wd = x.shape[-2:]
        # at least two cells at the coarsest scale: its group norms need more than one value a group
        pad_h = max(-h % self.downscale, 2 * self.downscale - h)
        pad_w = max(-wd % self.downscale, 2 * self.downscale - wd)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        fused = self.has_fidelity and not is_zero(w)
        feature, skips = self.lq_encoder.features(x)  # (B, C, h, w), {factor: (B, C_f, H/f, W/f)}
        logits = self.transformer(
            self.conditioning.feature(feature, level), self.conditioning.vector(level, x.shape[0])
        )
        latent = self.codebook.fuse(
            straight_through_codes(logits.common, self.codebook.common),
            straight_through_codes(logits.hq, self.codebook.hq),
        )
        if fused and self.fidelity.adain:
            latent = adain(latent, feature.detach())
        fuse = None
        seen: dict[int, Tensor] = {}  # decoder features by factor, for the image-level fusion
        if fused:
            skips = {f: s.detach() for f, s in skips.items()}  # the fusion never trains the encoder
            fidelity = self.fidelity

            def fuse(factor: int, dec: Tensor) -> Tensor:
                out = fidelity.fuse(factor, dec, skips, w, level)
                seen[factor] = out
                return out

        image = self.decoder(latent, fuse)
        corrected = None
        if fused and self.fidelity.image is not None:
            f = self.fidelity.image.factor
            image, corrected, _ = self.fidelity.image(x, skips[f], seen[f], image, w, level)
            corrected = corrected[..., :h, :wd]
        image = image[..., :h, :wd]
        return IQPIRResult(image, logits.common, logits.hq, feature, latent, corrected)

    def prior_frozen(self) -> bool:
        """True when the decoder and codebooks have no trainable parameter."""
        prior = [*self.decoder.parameters(), *self.codebook.parameters()]
        return not any(p.requires_grad for p in prior)

    def train(self, mode: bool = True) -> "IQPIRNet":
        super().train(mode)
        if self.prior_frozen():  # a frozen prior stays in eval (no codebook usage updates)
            self.decoder.eval()
            self.codebook.eval()
        return self


def freeze_prior_(net: IQPIRNet) -> IQPIRNet:
    """Freeze the decoder and both codebooks (requires_grad False, eval mode)."""
    for module in (net.decoder, net.codebook):
        module.requires_grad_(False)
        module.eval()
    return net


def freeze_all_but_fidelity_(net: IQPIRNet) -> IQPIRNet:
    """Freeze everything except the fusion blocks (the fidelity stage: CodeFormer's stage III)."""
    if not net.has_fidelity:
        raise ValueError("this IQPIR net has no fusion blocks (fidelity_scales is empty)")
    net.requires_grad_(False)
    net.fidelity.requires_grad_(True)
    for module in (net.lq_encoder, net.transformer, net.conditioning, net.decoder, net.codebook):
        module.eval()
    return net


def init_from_stage1(net: IQPIRNet, autoencoder: VQAutoencoder) -> IQPIRNet:
    """Copy the stage-1 encoder into the LQ encoder, and the stage-1 decoder and codebooks into the
    frozen prior; returns ``net`` (modified in place). Architectures must match."""
    try:
        net.lq_encoder.load_state_dict(autoencoder.encoder.state_dict())
        net.decoder.load_state_dict(autoencoder.decoder.state_dict())
        net.codebook.load_state_dict(autoencoder.codebook.state_dict())
    except RuntimeError as err:
        raise ValueError(f"init_from_stage1: stage-1 autoencoder does not match the IQPIR net ({err})") from err
    return freeze_prior_(net)
