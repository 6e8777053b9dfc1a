"""Stage 2: train the LQ encoder and code-prediction transformer against the frozen stage-1 prior."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from qualiteacher.archs.codebooks import DualQuantized, Fusion
from qualiteacher.archs.conditioning import CondMode
from qualiteacher.archs.iqpir import IQPIRNet, IQPIRResult, init_from_stage1
from qualiteacher.archs.presets import build_autoencoder, build_iqpir
from qualiteacher.archs.vqae import Encoder, VQAutoencoder
from qualiteacher.training.distributed import set_conditioning_trainable_
from qualiteacher.training.students import read_checkpoint_state


class CodeLosses(NamedTuple):
    """Unweighted stage-2 terms (scalars); acc_* are code-prediction accuracies (no gradient)."""

    ce_common: Tensor
    ce_hq: Tensor
    feature: Tensor
    acc_common: Tensor
    acc_hq: Tensor


def code_prediction_losses(pred: IQPIRResult, target: DualQuantized) -> CodeLosses:
    """CE of both logit maps against the target indices, MSE between the LQ encoder feature and the
    target fused latent (the selected code sum)."""
    ce_common = F.cross_entropy(pred.logits_common.flatten(0, 2), target.indices_common.flatten())
    ce_hq = F.cross_entropy(pred.logits_hq.flatten(0, 2), target.indices_hq.flatten())
    feature = F.mse_loss(pred.feature, target.z.detach())
    with torch.no_grad():
        acc_common = (pred.logits_common.argmax(-1) == target.indices_common).float().mean()
        acc_hq = (pred.logits_hq.argmax(-1) == target.indices_hq).float().mean()
    return CodeLosses(ce_common, ce_hq, feature, acc_common, acc_hq)


class Stage2Module(L.LightningModule):
    """Code prediction on paired data (``batch["labeled"]["lq"]``, ``["gt"]``).

    Targets are the frozen stage-1 quantisation of the gt encoding with the HQ branch on for every
    sample (gt images are clean references and the student always decodes common + HQ codes).
    Loss: ``w_ce (CE_common + CE_hq) + w_feature MSE(feature, code sum) + w_l1 L1(output, gt)``, the
    L1 flowing through the straight-through codes. The decoder and codebooks are frozen and not in
    the optimiser. Stage-1 weights come from ``stage1_checkpoint`` (a Stage1Module checkpoint, loaded
    in ``setup``) or :meth:`init_from_autoencoder`. ``student`` is the IQPIRNet for later stages.
    """

    def __init__(
        self,
        preset: str = "tiny",
        cond_mode: CondMode = "add",
        fusion: Fusion = "add",
        stage1_checkpoint: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        w_ce: float = 1.0,
        w_feature: float = 1.0,
        w_l1: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.student: IQPIRNet = build_iqpir(preset, cond_mode, fusion)
        if self.student.fidelity is not None:  # trained later, in the fidelity stage (w = 0 here)
            self.student.fidelity.requires_grad_(False)
        set_conditioning_trainable_(self.student, False)  # unused until stage 3 (DDP needs used weights)
        self.target_encoder: Encoder = copy.deepcopy(self.student.lq_encoder)  # frozen stage-1 encoder
        self.initialised = False

    def init_from_autoencoder(self, autoencoder: VQAutoencoder) -> None:
        """Take encoder, decoder and codebooks from a trained stage-1 autoencoder and freeze the prior."""
        init_from_stage1(self.student, autoencoder)
        self.target_encoder.load_state_dict(autoencoder.encoder.state_dict())
        self.target_encoder.requires_grad_(False).eval()
        self.initialised = True

    def setup(self, stage: str) -> None:
        if self.initialised:
            return
        path = self.hparams.stage1_checkpoint
        if path is None:
            raise ValueError(
                "Stage2Module needs the stage-1 autoencoder: pass stage1_checkpoint=<stage-1 .ckpt> "
                "or call init_from_autoencoder(ae) before fitting"
            )

        state = read_checkpoint_state(path)
        sub = {k.removeprefix("autoencoder."): v for k, v in state.items() if k.startswith("autoencoder.")}
        if not sub:
            raise ValueError(f"{path} holds no 'autoencoder.*' weights: is it a stage-1 checkpoint?")
        ae = build_autoencoder(self.hparams.preset, self.hparams.fusion)
        ae.load_state_dict(sub)
        self.init_from_autoencoder(ae)

    def train(self, mode: bool = True) -> "Stage2Module":
        super().train(mode)
        self.target_encoder.eval()  # frozen, always eval
        return self

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        return self.student(x, level, w=0.0).image

    @torch.no_grad()
    def targets(self, gt: Tensor) -> DualQuantized:
        """Frozen stage-1 quantisation of ``gt`` (all samples HQ)."""
        return self.student.codebook(self.target_encoder(gt), None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        lq, gt = batch["labeled"]["lq"], batch["labeled"]["gt"]
        hp = self.hparams
        target = self.targets(gt)
        pred = self.student.predict(lq, None, w=0.0)  # code prediction: the pure codebook prior
        losses = code_prediction_losses(pred, target)
        l1 = F.l1_loss(pred.image, gt)
        total = hp.w_ce * (losses.ce_common + losses.ce_hq) + hp.w_feature * losses.feature + hp.w_l1 * l1
        logs = {**losses._asdict(), "l1": l1, "total": total}
        self.log_dict({f"stage2/{k}": v.detach() for k, v in logs.items()}, batch_size=lq.shape[0])
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "gt" not in batch:
            return
        out = self.student(batch["lq"], None, w=0.0).image
        self.log("stage2/val_l1", F.l1_loss(out, batch["gt"]), batch_size=out.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
