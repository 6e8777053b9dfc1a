"""Supervised warm-up of a plug-in student on paired synthetic data (the U-Net's stage 2)."""
from __future__ import annotations

from typing import Any, Literal

import kornia
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.training.distributed import set_conditioning_trainable_
from qualiteacher.training.students import build_student


class WarmupModule(L.LightningModule):
    """``L1(S(x, none), y) + w_ssim (1 - SSIM)`` on paired data; the result becomes teacher and student."""

    def __init__(self, student: Literal["iqpir", "unet"] = "unet", preset: str = "tiny",
                 cond_mode: Literal["add", "adaln"] = "add", lr: float = 2e-4, w_ssim: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.student = build_student(student, preset, cond_mode)
        set_conditioning_trainable_(self.student, False)  # unused until stage 3 (DDP needs used weights)

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> Tensor:
        lab = batch["labeled"]
        out = self.student(lab["lq"], None)
        l1 = F.l1_loss(out.image, lab["gt"])
        ssim = kornia.losses.ssim_loss(out.image.clamp(0, 1), lab["gt"], window_size=7)
        total = l1 + self.hparams.w_ssim * ssim + out.aux_loss
        self.log_dict({"warmup/l1": l1, "warmup/ssim": ssim, "warmup/total": total},
                      on_step=True, on_epoch=False, batch_size=lab["lq"].shape[0])
        self.log("loss", total, prog_bar=True, logger=False, batch_size=lab["lq"].shape[0])
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr)
