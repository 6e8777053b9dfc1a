import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from qualiteacher.archs.iqpir import IQPIRNet
from qualiteacher.losses.gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from qualiteacher.losses.perceptual import VGGPerceptualLoss, default_vgg16_path
from qualiteacher.training.stage1 import Stage1Module, reconstruction_losses
from qualiteacher.training.stage2 import Stage2Module, code_prediction_losses


def smooth_fields(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random but structured images: upsampled low-resolution noise, (n, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


class PairedFields(Dataset):
    """Batches in the design.md format: {"labeled": {"lq", "gt", "quality", "id"}}; lq = hazy gt."""

    def __init__(self, n: int = 16) -> None:
        self.gt = smooth_fields(n)
        self.lq = 0.6 * self.gt + 0.4 * 0.8  # uniform haze
        q = torch.linspace(0.3, 1.0, n)
        q[::5] = float("nan")  # unknown scores
        self.quality = q

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict:
        return {"labeled": {"lq": self.lq[i], "gt": self.gt[i], "quality": self.quality[i], "id": str(i)}}


class Recorder(L.Callback):
    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.values.append(float(trainer.callback_metrics[self.key]))


def _fit(module: L.LightningModule, key: str, steps: int) -> list[float]:
    rec = Recorder(key)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    trainer.fit(module, DataLoader(PairedFields(), batch_size=4, shuffle=True))
    return rec.values


def _decreases(values: list[float]) -> bool:
    return sum(values[-5:]) / 5 < sum(values[:5]) / 5


def test_gan_loss_functions():
    assert hinge_d_loss(torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(1), torch.zeros(1)).item() == 1.0
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    w = torch.ones(3, requires_grad=True)
    weight = adaptive_gan_weight((w * 4).sum(), (w * 2).sum(), w)
    assert torch.isclose(weight, torch.tensor(2.0), atol=1e-3) and not weight.requires_grad


def test_reconstruction_losses_zero_on_identity():
    x = smooth_fields(2)
    rec = reconstruction_losses(x, x)
    assert rec.l1.item() == 0.0 and rec.ssim.item() < 1e-4
    assert reconstruction_losses(x, x.flip(0)).ssim > 0.01


def test_stage1_and_stage2_decrease_their_losses(tmp_path):
    torch.manual_seed(0)
    stage1 = Stage1Module(preset="tiny", lr=3e-3, disc_lr=1e-3, gan_start_step=20, disc_channels=8)
    l1 = _fit(stage1, "stage1/l1", 40)
    # Lightning counts both optimisers' steps once the discriminator trains: 20 + 2 x 10
    assert len(l1) == 30 and int(stage1.generator_steps) == 30
    assert _decreases(l1), l1
    metrics = stage1.trainer.callback_metrics
    for name in ("ssim", "codebook_common", "codebook_hq", "gan_g", "gan_d", "gan_weight", "hq_fraction"):
        assert torch.isfinite(metrics[f"stage1/{name}"]), name

    torch.manual_seed(0)
    stage2 = Stage2Module(preset="tiny", lr=3e-3)
    stage2.init_from_autoencoder(stage1.autoencoder)
    frozen = {k: v.clone() for k, v in stage2.student.decoder.state_dict().items()}
    total = _fit(stage2, "stage2/total", 40)
    assert _decreases(total), total
    assert isinstance(stage2.student, IQPIRNet)
    for k, v in stage2.student.decoder.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen decoder changed: {k}"
    opt_params = {id(p) for g in stage2.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in stage2.student.codebook.parameters()}
    assert not opt_params & {id(p) for p in stage2.target_encoder.parameters()}

    # the stage-2 checkpoint feeds later stages: its student.* weights rebuild the same student
    from qualiteacher.archs.iqpir import freeze_prior_
    from qualiteacher.archs.presets import build_iqpir
    from qualiteacher.training.students import load_student_weights

    stage2.trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    student = freeze_prior_(build_iqpir("tiny"))
    load_student_weights(student, tmp_path / "stage2.ckpt")
    x = smooth_fields(2, seed=3)
    with torch.no_grad():
        assert torch.allclose(student(x, None).image, stage2.student.eval()(x, None).image)
    # a stage 3 with another conditioning cannot take these weights: say why, not a raw key list
    with pytest.raises(ValueError, match="same cond_mode"):
        load_student_weights(build_iqpir("tiny", cond_mode="adaln"), tmp_path / "stage2.ckpt")


def test_stage2_needs_stage1_weights(tmp_path):
    with pytest.raises(ValueError, match="stage1_checkpoint"):
        Stage2Module(preset="tiny").setup("fit")
    stage1 = Stage1Module(preset="tiny")
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict()}, path)
    stage2 = Stage2Module(preset="tiny", stage1_checkpoint=str(path))
    stage2.setup("fit")
    assert stage2.student.prior_frozen()
    assert torch.equal(stage2.target_encoder.conv_in.weight, stage1.autoencoder.encoder.conv_in.weight)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Stage2Module(preset="tiny", stage1_checkpoint=str(tmp_path / "missing.ckpt")).setup("fit")


def test_code_prediction_losses_on_perfect_logits():
    stage2 = Stage2Module(preset="tiny")
    gt = smooth_fields(2)
    target = stage2.targets(gt)
    pred = stage2.student.predict(gt, None)
    perfect = pred._replace(
        logits_common=F.one_hot(target.indices_common, 32).float() * 100,
        logits_hq=F.one_hot(target.indices_hq, 32).float() * 100,
        feature=target.z,
    )
    losses = code_prediction_losses(perfect, target)
    assert losses.ce_common < 1e-6 and losses.ce_hq < 1e-6 and losses.feature == 0
    assert losses.acc_common == 1 and losses.acc_hq == 1


def test_perceptual_loss_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        VGGPerceptualLoss(allow_download=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        VGGPerceptualLoss(tmp_path / "nope.pth")
    module = Stage1Module(preset="tiny", w_perceptual=1.0, perceptual_weights=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="perceptual"):
        module.setup("fit")
    assert default_vgg16_path().parent == tmp_path / "torch" / "hub" / "checkpoints"


def test_perceptual_loss_from_local_file(tmp_path):
    torch.manual_seed(0)
    # the first VGG16 layers (up to relu1_2) with random weights, saved like torchvision's file
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1))
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss = VGGPerceptualLoss(path, layers=("relu1_2",))
    x = smooth_fields(2)
    assert loss(x, x).item() == 0.0
    y = x.clone().requires_grad_(True)
    value = loss(y, x.flip(0))
    value.backward()
    assert value > 0 and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(ValueError, match="not a VGG16"):
        VGGPerceptualLoss(path, layers=("relu2_2",))
    # stage 1 with the perceptual term on: logged, and the frozen VGG stays out of checkpoints
    module = Stage1Module(preset="tiny", w_perceptual=1.0, perceptual_weights=str(path))
    module.perceptual = VGGPerceptualLoss(path, layers=("relu1_2",))  # setup() keeps an existing one
    values = _fit(module, "stage1/perceptual", 2)
    assert len(values) == 2 and all(v > 0 for v in values)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("perceptual.") for k in ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])  # strict: the VGG keys were put back


def test_stage1_restarts_dead_codes_of_both_codebooks():
    from qualiteacher.training.stage1 import Stage1Module

    torch.manual_seed(0)
    module = Stage1Module(preset="tiny", restart_dead_codes_every=1).train()
    out = module.autoencoder(torch.rand(4, 3, 32, 32), torch.tensor([0.9, 0.2, 0.8, float("nan")]))
    cb = module.autoencoder.codebook
    dead = int(cb.common.dead_codes()), int(cb.hq.dead_codes())
    moved = module._restart_dead_codes(out, 4)
    assert (int(moved["restarted_common"]), int(moved["restarted_hq"])) == dead and min(dead) > 0
    assert int(cb.common.usage.sum()) == 0 and int(cb.hq.usage.sum()) == 0
