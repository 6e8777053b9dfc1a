"""Fidelity stage: train IQPIR's fusion blocks on paired data (CodeFormer's stage III, METHOD.md §5).

Runs after stage 2: the LQ encoder, code transformer, conditioning, codebooks and decoder stay as
stage 2 left them (frozen); only the fusion blocks learn, with ``w = 1``, to pull the decoded
codebook prior towards the ground truth using the LQ encoder's features.
"""
from __future__ import annotations

from typing import Any

import kornia
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.archs.conditioning import CondMode
from qualiteacher.archs.context import fixed_prior_statistics, prior_statistics
from qualiteacher.archs.iqpir import IQPIRNet, freeze_all_but_fidelity_
from qualiteacher.archs.presets import build_iqpir
from qualiteacher.losses.perceptual import VGGPerceptualLoss
from qualiteacher.training.distributed import set_conditioning_trainable_
from qualiteacher.training.students import load_student_weights


class FidelityModule(L.LightningModule):
    """Fusion-block training on ``batch["labeled"]`` (``lq``, ``gt``).

    Loss: ``w_l1 L1 + w_ssim (1 - SSIM)/2 (+ w_perceptual VGG)`` of ``S(lq, none, w=train_w)``
    against ``gt``, plus ``w_affine L1`` of the image-level fusion's affine correction alone (deep
    supervision: trained only inside the blend, the correction learnt to over-saturate and lean on
    the colourless decode; on its own it must be a restorer). The released recipe adds a GAN term; it is left out here (our stage-1
    discriminator is available, but at the step counts this stage gets on a CPU it costs fidelity).
    ``stage2_checkpoint`` is loaded in ``setup`` (strict); ``student`` becomes stage 3's init.
    """

    def __init__(
        self,
        preset: str = "tiny",
        cond_mode: CondMode = "add",
        stage2_checkpoint: str | None = None,
        adain: bool = False,
        train_w: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        w_l1: float = 1.0,
        w_ssim: float = 0.5,
        w_perceptual: float = 0.0,
        perceptual_weights: str | None = None,
        w_affine: float = 1.0,
        fusion_prior: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.student: IQPIRNet = build_iqpir(preset, cond_mode, adain=adain, prior=fusion_prior)
        if not self.student.has_fidelity:
            raise ValueError(f"architecture preset {preset!r} has no fidelity_scales: nothing to train")
        self.perceptual: torch.nn.Module | None = None
        self.initialised = False

    def setup(self, stage: str) -> None:
        if self.hparams.w_perceptual > 0 and self.perceptual is None:
            self.perceptual = VGGPerceptualLoss(self.hparams.perceptual_weights).requires_grad_(False)
        if not self.initialised and stage == "fit":
            if self.hparams.stage2_checkpoint is None:
                raise ValueError("FidelityModule needs the stage-2 student: pass stage2_checkpoint=<stage-2 .ckpt>")
            # stage 2 never trains the fidelity path: its (initial) fusion weights are not read
            load_student_weights(self.student, self.hparams.stage2_checkpoint, keep_own=("fidelity.",))
            self.initialised = True
        freeze_all_but_fidelity_(self.student)
        set_conditioning_trainable_(self.student, False)  # the blocks' level embeddings: unused until stage 3

    def forward(self, x: Tensor, level: Tensor | None = None, w: float | None = None) -> Tensor:
        return self.student(x, level, w).image

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        lq, gt = batch["labeled"]["lq"], batch["labeled"]["gt"]
        whole = batch["labeled"].get("context")  # the whole images: the fusion prior's statistics
        with fixed_prior_statistics(self.student, prior_statistics(self.student, whole)):
            return self._step(lq, gt)

    def _step(self, lq: Tensor, gt: Tensor) -> Tensor:
        hp = self.hparams
        result = self.student.predict(lq, None, w=hp.train_w)
        out = result.image
        l1 = F.l1_loss(out, gt)
        ssim = kornia.losses.ssim_loss(out.clamp(0, 1), gt, window_size=min(11, min(gt.shape[-2:]) // 2 * 2 - 1))
        total = hp.w_l1 * l1 + hp.w_ssim * ssim
        logs = {"l1": l1, "ssim": ssim}
        if result.corrected is not None and hp.w_affine > 0:
            logs["affine_l1"] = F.l1_loss(result.corrected, gt)
            total = total + hp.w_affine * logs["affine_l1"]
        if self.perceptual is not None:
            logs["perceptual"] = self.perceptual(out, gt)
            total = total + hp.w_perceptual * logs["perceptual"]
        with torch.no_grad():
            prior = self.student(lq, None, w=0.0).image if self.global_step % 25 == 0 else None
        if prior is not None:
            logs["prior_l1"] = F.l1_loss(prior, gt)  # what the pure prior gives: the gap fusion closes
        logs["total"] = total
        self.log_dict({f"fidelity/{k}": v.detach() for k, v in logs.items()}, on_step=True, on_epoch=False,
                      batch_size=lq.shape[0])
        self.log("loss", total, prog_bar=True, logger=False, batch_size=lq.shape[0])
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "gt" not in batch:
            return
        out = self.student(batch["lq"], None, w=self.hparams.train_w).image
        self.log("fidelity/val_l1", F.l1_loss(out, batch["gt"]), batch_size=out.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.student.fidelity.parameters())
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("perceptual.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.initialised = True  # resuming: the weights come from the checkpoint itself
        if self.perceptual is not None:
            checkpoint["state_dict"].update({f"perceptual.{k}": v for k, v in self.perceptual.state_dict().items()})
