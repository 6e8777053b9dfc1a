"""Stage 1: train the VQ autoencoder and its dual codebook on clean images."""

from __future__ import annotations

from typing import Any, NamedTuple

import kornia
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.archs.codebooks import Fusion
from qualiteacher.archs.discriminator import PatchDiscriminator
from qualiteacher.archs.presets import build_autoencoder
from qualiteacher.archs.vqae import AutoencoderOutput
from qualiteacher.losses.gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from qualiteacher.losses.perceptual import VGGPerceptualLoss


class ReconstructionLosses(NamedTuple):
    """Unweighted stage-1 reconstruction terms (scalars)."""

    l1: Tensor
    ssim: Tensor


def reconstruction_losses(pred: Tensor, target: Tensor, ssim_window: int = 11) -> ReconstructionLosses:
    """L1 and SSIM loss ((1 - SSIM) / 2, kornia) between images in [0, 1]."""
    window = min(ssim_window, min(target.shape[-2:]) // 2 * 2 - 1)  # odd, fits small crops
    return ReconstructionLosses(F.l1_loss(pred, target), kornia.losses.ssim_loss(pred, target, window))


class Stage1Module(L.LightningModule):
    """VQ autoencoder + dual codebook on clean images (``batch["labeled"]["gt"]``) with their fused
    quality scores (``batch["labeled"]["quality"]``; NaN = unknown, treated as not HQ, so the HQ
    codebook only learns from images scored >= ``hq_threshold``).

    Loss: ``w_l1 L1 + w_ssim SSIM (+ w_perceptual VGG) + codebook losses`` and, from generator step
    ``gan_start_step``, ``w_gan * lambda * hinge_G`` with the VQGAN adaptive weight ``lambda``; the
    patch discriminator trains with the hinge loss from the same step. Every
    ``restart_dead_codes_every`` generator steps (0: never) the codes no batch selected since the
    last restart move onto this batch's encoder outputs (``VectorQuantizer.restart_dead_codes_``). Manual optimisation: the
    generator step counter is the ``generator_steps`` buffer (Lightning's ``global_step`` counts both
    optimisers once the discriminator trains, so ``max_steps = gan_start_step + 2 * later_batches``).
    """

    def __init__(
        self,
        preset: str = "tiny",
        fusion: Fusion = "add",
        hq_threshold: float = 0.70,
        lr: float = 1e-4,
        disc_lr: float = 1e-4,
        weight_decay: float = 0.0,
        w_l1: float = 1.0,
        w_ssim: float = 1.0,
        w_perceptual: float = 0.0,
        perceptual_weights: str | None = None,
        w_codebook: float = 1.0,
        w_gan: float = 0.1,
        gan_start_step: int = 2000,
        disc_channels: int = 32,
        disc_layers: int = 3,
        restart_dead_codes_every: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.autoencoder = build_autoencoder(preset, fusion, hq_threshold)
        self.discriminator = PatchDiscriminator(3, disc_channels, disc_layers)
        self.perceptual: torch.nn.Module | None = None  # built in setup(): loads weights
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))

    def setup(self, stage: str) -> None:
        if self.hparams.w_perceptual > 0 and self.perceptual is None:
            self.perceptual = VGGPerceptualLoss(self.hparams.perceptual_weights)

    def forward(self, x: Tensor, quality: Tensor | None = None) -> AutoencoderOutput:
        return self.autoencoder(x, quality)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        opt_g, opt_d = self.optimizers()
        gt, quality = batch["labeled"]["gt"], batch["labeled"].get("quality")
        gan_on = int(self.generator_steps) >= self.hparams.gan_start_step
        hp = self.hparams

        # generator: reconstruction + codebooks (+ adversarial)
        self.toggle_optimizer(opt_g)
        out = self.autoencoder(gt, quality)
        rec = reconstruction_losses(out.image, gt)
        rec_total = hp.w_l1 * rec.l1 + hp.w_ssim * rec.ssim
        logs = {"l1": rec.l1, "ssim": rec.ssim}
        if self.perceptual is not None:
            logs["perceptual"] = self.perceptual(out.image, gt)
            rec_total = rec_total + hp.w_perceptual * logs["perceptual"]
        total = rec_total + hp.w_codebook * out.quant.loss
        if gan_on and hp.w_gan > 0:
            g_loss = hinge_g_loss(self.discriminator(out.image))
            weight = adaptive_gan_weight(rec_total, g_loss, self.autoencoder.decoder.last_layer)
            total = total + hp.w_gan * weight * g_loss
            logs |= {"gan_g": g_loss, "gan_weight": weight}
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.generator_steps += 1
        every = hp.restart_dead_codes_every
        if every and int(self.generator_steps) % every == 0:
            logs |= self._restart_dead_codes(out, gt.shape[0])

        # discriminator: hinge on real clean images vs detached reconstructions
        if gan_on and hp.w_gan > 0:
            self.toggle_optimizer(opt_d)
            d_loss = hinge_d_loss(self.discriminator(gt), self.discriminator(out.image.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            logs["gan_d"] = d_loss

        q = out.quant
        logs |= {
            "codebook_common": q.loss_common, "codebook_hq": q.loss_hq, "total": total,
            "perplexity_common": q.perplexity_common, "perplexity_hq": q.perplexity_hq,
            "hq_fraction": q.hq_mask.float().mean(),
        }
        self.log_dict({f"stage1/{k}": v.detach() for k, v in logs.items()}, prog_bar=False, batch_size=gt.shape[0])
        return total.detach()

    def _restart_dead_codes(self, out: AutoencoderOutput, batch: int) -> dict[str, Tensor]:
        # codes unused for `restart_dead_codes_every` steps move onto this batch's encoder outputs
        # (common: the latent; HQ: the residual it quantises, of the HQ samples only)
        cb = self.autoencoder.codebook
        latent = out.latent.detach()
        flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
        moved_common = cb.common.restart_dead_codes_(flat)
        residual = ((latent - out.quant.z_common.detach()) / cb.hq_weight)[out.quant.hq_mask]
        moved_hq = cb.hq.restart_dead_codes_(residual.permute(0, 2, 3, 1).reshape(-1, latent.shape[1]))
        return {"restarted_common": torch.tensor(float(moved_common)), "restarted_hq": torch.tensor(float(moved_hq))}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        gt = batch["gt"] if "gt" in batch else batch["lq"]  # clean-only sets serve the clean image as lq
        f = self.autoencoder.encoder.downscale
        gt = gt[..., : gt.shape[-2] // f * f, : gt.shape[-1] // f * f]
        out = self.autoencoder(gt, None)
        self.log("stage1/val_l1", F.l1_loss(out.image, gt), batch_size=gt.shape[0])

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        opt_g = torch.optim.AdamW(self.autoencoder.parameters(), lr=hp.lr, betas=(0.5, 0.9), weight_decay=hp.weight_decay)
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=hp.disc_lr, betas=(0.5, 0.9), weight_decay=hp.weight_decay)
        return [opt_g, opt_d]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen VGG stays out of checkpoints
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("perceptual.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.perceptual is not None:
            checkpoint["state_dict"].update({f"perceptual.{k}": v for k, v in self.perceptual.state_dict().items()})
