"""IQPIR's fidelity path (METHOD.md §5): the w dial, detached encoder features, AdaIN, the fidelity stage."""
import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from qualiteacher.archs.fidelity import FidelityPath, adain
from qualiteacher.archs.iqpir import freeze_all_but_fidelity_, freeze_prior_
from qualiteacher.archs.presets import PRESETS, build_iqpir, list_presets
from qualiteacher.training.fidelity import FidelityModule
from qualiteacher.training.students import load_student_weights


def _net(preset="tiny", **kw):
    torch.manual_seed(0)
    return build_iqpir(preset, **kw).eval()


def test_w_zero_is_the_pure_prior_exactly():
    net = _net()
    x, level = torch.rand(2, 3, 32, 32), torch.tensor([0, 7])  # fresh fusion weights are random: w matters
    with torch.no_grad():
        fused_zero = net(x, level, w=0.0).image
        fused_zero_t = net(x, level, w=torch.zeros(2)).image
        fused_one = net(x, level, w=1.0).image
        prior = copy.deepcopy(net)
        prior.fidelity = None  # today's codebook-only IQPIR
        pure = prior(x, level).image
    assert torch.equal(fused_zero, pure)
    assert torch.equal(fused_zero_t, pure)
    assert not torch.allclose(fused_one, pure)


def test_w_is_a_dial_per_image_and_default():
    net = _net(default_w=0.5)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        per_image = net(x, None, w=torch.tensor([0.0, 1.0])).image
        zero, one = net(x, None, w=0.0).image, net(x, None, w=1.0).image
        assert torch.allclose(per_image[0], zero[0]) and torch.allclose(per_image[1], one[1], atol=1e-6)
        assert torch.allclose(net(x, None).image, net(x, None, w=0.5).image)
    with pytest.raises(ValueError, match="fidelity w"):
        net(x, None, w=torch.ones(3))


def test_gradients_reach_the_fusion_blocks_not_the_frozen_prior():
    net = freeze_prior_(_net().train())
    net(torch.rand(2, 3, 32, 32), torch.tensor([1, 7]), w=1.0).image.mean().backward()
    # the image-level fusion's head is zero-initialised: at step 0 only the head gets a gradient
    # (and its level embedding: zero too, it scales nothing yet); everything else does
    upstream_of_zero_head = ("image.stem", "image.block", "image.context", "image.level_embedding")
    for name, p in net.fidelity.named_parameters():
        if name.startswith(upstream_of_zero_head) or "level_embedding" in name:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in [*net.decoder.parameters(), *net.codebook.parameters()])


def test_image_fusion_starts_as_a_blend_of_input_and_decode_and_learns():
    # zero-initialised: M = I, b = 0, g = 0.5, so the output is halfway between the decode and the
    # input itself; one optimizer step later the upstream layers get gradients too
    net = freeze_prior_(_net().train())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        prior = net(x, None, w=0.0).image
        out = net(x, None, w=1.0).image
        blocks_only = copy.deepcopy(net)
        blocks_only.fidelity.image = None
        decoded = blocks_only(x, None, w=1.0).image
    assert torch.allclose(out, 0.5 * decoded + 0.5 * x, atol=1e-5)
    assert not torch.allclose(out, prior)
    opt = torch.optim.SGD(net.fidelity.parameters(), lr=0.1)
    target = x.flip(1)  # swap the colour channels: a pure colour-matrix job
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.l1_loss(net(x, None, w=1.0).image, target).backward()
        opt.step()
    assert net.fidelity.image.stem[0].weight.grad.abs().sum() > 0


def test_image_fusion_can_be_the_identity_on_a_clean_photo():
    # do no harm is reachable: M = I, b = 0 and an open gate return the input exactly
    net = _net()
    with torch.no_grad():
        net.fidelity.image.head.bias[12] = 30.0  # gate logit -> g = 1
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x, None, w=1.0).image, x, atol=1e-5)


def test_fidelity_stage_freezes_everything_but_fusion():
    net = freeze_all_but_fidelity_(_net().train())
    net(torch.rand(2, 3, 32, 32), None, w=1.0).image.mean().backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fidelity.") for n in trainable)
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("fidelity."))


def test_encoder_features_reach_the_fusion_detached(monkeypatch):
    net = _net().train()
    seen = []
    original = FidelityPath.fuse

    def spy(self, factor, dec, skips, w, level):
        seen.append(skips[factor].requires_grad)
        return original(self, factor, dec, skips, w, level)

    monkeypatch.setattr(FidelityPath, "fuse", spy)
    net(torch.rand(1, 3, 32, 32), None, w=1.0)
    assert seen and not any(seen)


def test_adain_matches_the_lq_feature_channel_statistics():
    torch.manual_seed(0)
    content, style = torch.randn(2, 8, 6, 6) * 3 + 1, torch.randn(2, 8, 6, 6) * 0.5 - 2
    out = adain(content, style)
    assert torch.allclose(out.mean((-2, -1)), style.mean((-2, -1)), atol=1e-4)
    assert torch.allclose(out.std((-2, -1)), style.std((-2, -1)), atol=1e-3)
    net = _net(adain=True)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x, None, w=0.0).image, _net()(x, None, w=0.0).image)  # w = 0: prior, no AdaIN
        assert not torch.allclose(net(x, None, w=1.0).image, _net()(x, None, w=1.0).image)


@pytest.mark.parametrize("preset", [p for p in list_presets() if PRESETS[p].resolution <= 96])
def test_every_small_preset_runs_forward_and_backward(preset):
    net = freeze_prior_(build_iqpir(preset).train())
    size = PRESETS[preset].resolution // 2
    out = net(torch.rand(2, 3, size, size), torch.tensor([0, 7]), w=0.5).image
    assert out.shape == (2, 3, size, size)
    out.mean().backward()
    assert all(p.grad is not None for p in net.fidelity.parameters())


def test_paper_preset_builds_with_the_released_fusion_scales():
    with torch.device("meta"):
        net = build_iqpir("paper")
        out = net(torch.empty(1, 3, 512, 512), None, w=0.5).image  # (level checks read values: not on meta)
    assert out.shape == (1, 3, 512, 512)
    assert sorted(int(k) for k in net.fidelity.blocks) == [2, 4, 8, 16]  # 256, 128, 64, 32 px


def test_an_old_checkpoint_without_fusion_blocks_gives_one_clear_message(tmp_path):
    old = _net()
    state = {f"student.{k}": v for k, v in old.state_dict().items() if not k.startswith("fidelity.")}
    torch.save({"state_dict": state}, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="predates IQPIR's fidelity path"):
        load_student_weights(_net(), tmp_path / "old.ckpt")
    load_student_weights(_net(), tmp_path / "old.ckpt", allow_missing=("fidelity.",))  # the fidelity stage may


def test_fidelity_stage_trains_only_the_fusion_blocks(tmp_path):
    torch.manual_seed(0)
    stage2 = build_iqpir("tiny")
    torch.save({"state_dict": {f"student.{k}": v for k, v in stage2.state_dict().items()}}, tmp_path / "s2.ckpt")
    module = FidelityModule(preset="tiny", stage2_checkpoint=str(tmp_path / "s2.ckpt"), lr=1e-2)
    gt = torch.rand(4, 3, 32, 32)
    lq = (0.6 * gt + 0.4).clamp(0, 1)
    loader = DataLoader([{"labeled": {"lq": lq, "gt": gt}}] * 30, batch_size=None)  # one fixed batch a step
    before = copy.deepcopy(stage2.state_dict())
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with torch.no_grad():
        start = torch.nn.functional.l1_loss(_load(stage2)(lq, None, w=1.0).image, gt)
    trainer.fit(module, train_dataloaders=loader)
    after = module.student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("fidelity.") for k in changed)
    with torch.no_grad():
        end = torch.nn.functional.l1_loss(module.student.eval()(lq, None, w=1.0).image, gt)
    assert end < start


def _load(net):
    return copy.deepcopy(net).eval()


def test_image_fusion_with_a_prior_starts_halfway_to_the_classical_restorer():
    # with a prior the affine map starts on x + 0.5 (p - x), p the classical restorer's output
    from qualiteacher.classical import classical_restorer

    net = _net(prior="dcp")
    gt = torch.rand(2, 3, 32, 32)
    x = 0.5 * gt + 0.5 * 0.8  # thin grey haze
    with torch.no_grad():
        out = net(x, None, w=1.0).image
        blocks_only = copy.deepcopy(net)
        blocks_only.fidelity.image = None
        decoded = blocks_only(x, None, w=1.0).image
        p = classical_restorer("dcp")(x)
    assert not torch.allclose(p, x, atol=1e-2)  # the prior does something here
    assert torch.allclose(out, 0.5 * decoded + 0.5 * (0.5 * x + 0.5 * p), atol=1e-5)
    assert net.fidelity.image.stem[0].in_channels == 6 and net.fidelity.image.head.out_channels == 14
    with pytest.raises(ValueError, match="unknown classical restorer"):
        build_iqpir("tiny", prior="no_such_method")


def test_fidelity_stage_with_a_prior_starts_from_a_stage2_checkpoint_without_one(tmp_path):
    # stage 2 never trains the fusion: its fusion weights (of another shape here) are not read
    torch.manual_seed(0)
    stage2 = build_iqpir("tiny")
    torch.save({"state_dict": {f"student.{k}": v for k, v in stage2.state_dict().items()}}, tmp_path / "s2.ckpt")
    module = FidelityModule(preset="tiny", stage2_checkpoint=str(tmp_path / "s2.ckpt"), fusion_prior="lime")
    module.setup("fit")
    own, before = module.student.state_dict(), stage2.state_dict()
    assert all(torch.equal(own[k], before[k]) for k in own if not k.startswith("fidelity."))
    assert own["fidelity.image.stem.0.weight"].shape[1] == 6


def test_stage3_checkpoint_with_a_prior_restores_with_it(tmp_path):
    from test_safety import write_stage3_checkpoint

    from qualiteacher.training.restore import load_for_inference

    path = write_stage3_checkpoint(tmp_path / "s3.ckpt", student="iqpir", fusion_prior="dcp")
    trained = load_for_inference(path)
    assert trained.student.fidelity.image.prior == "dcp"
    with torch.no_grad():
        assert trained.student.eval()(torch.rand(1, 3, 24, 40), None).image.shape == (1, 3, 24, 40)
