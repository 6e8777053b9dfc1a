"""QualiTeacher stage 3: every loss term runs, checkpoints keep the bank, both students work."""
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from qualiteacher.data.datamodule import RestorationDataModule
from qualiteacher.training.restore import restore, tiled_apply
from qualiteacher.training.stage3 import QualiTeacherModule
from qualiteacher.archs.presets import build_unet

TERMS = ("sup", "pl", "pref", "pref_a", "pref_b", "crop", "total")


class Capture(Logger):
    """Keeps every logged metric per step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    name = "capture"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(int(step), {}).update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit(module, demo_root, steps, tmp_path=None, ckpt=None, logger=None, task="dehaze", callbacks=(),
         context_side=None):
    dm = RestorationDataModule(labeled_root=str(demo_root / task / "labeled"),
                               unlabeled_root=str(demo_root / task / "unlabeled"), crop_size=32, batch_size=2,
                               context_side=context_side)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger or False, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return trainer


def _module(ensemble, **kw):
    args = dict(preset="tiny", ensemble=ensemble, pref_start_step=2, crop_start_step=2, mask_block=16,
                views=("identity", "hflip", "vflip", "rot90"), n_aug_variants=1, ema_decay=0.9, lr=1e-3)
    args.update(kw)
    return QualiTeacherModule(**args)


def test_short_run_with_offline_ensemble_logs_every_term(demo_root):
    from qualiteacher.iqa.presets import build_ensemble

    cap = Capture()
    module = _module(build_ensemble("offline", task="dehaze"))
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    _fit(module, demo_root, 4, logger=cap)
    after_start = [row for step, row in cap.rows.items() if step >= 2]
    assert after_start, "no step logged after the preference start"
    for row in after_start:
        for term in TERMS:
            assert math.isfinite(row[f"stage3/{term}"]), term
            assert row[f"stage3/{term}"] != 0.0, f"{term} is zero after its start step"
    for row in (r for s, r in cap.rows.items() if s < 2):
        assert row["stage3/pref"] == 0.0 and row["stage3/crop"] == 0.0
    assert sum(row["stage3/pl_level_" + str(q)] for q in range(8) for row in [cap.rows[max(cap.rows)]]) > 0
    # the bank holds up to k entries for every unlabeled image seen; the teacher moved (EMA)
    assert 0 < len(module.bank) and all(len(v) <= 3 for v in module.bank.entries.values())
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters()))
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())


@pytest.mark.parametrize("mode", ["qualiteacher", "mean_teacher", "supervised"])
def test_every_training_forward_reads_the_airlight_of_the_whole_image(demo_root, fast_ensemble_factory, mode):
    """With ``context_side`` every forward of student and teacher on crops (supervised, pseudo-label,
    preference, consistency, refresh) uses its images' whole-image airlight, not the crop's own."""
    from qualiteacher.archs.fidelity import ImageFusion

    module = _module(fast_ensemble_factory(), fusion_prior="dcp", mode=mode, pref_start_step=0, crop_start_step=0)
    calls = {"student": [], "teacher": []}
    for name in calls:
        fusion = next(m for m in getattr(module, name).modules() if isinstance(m, ImageFusion))
        forward = fusion.forward

        def spy(x, *args, _fusion=fusion, _forward=forward, _seen=calls[name], **kw):
            if torch.is_grad_enabled() or _seen is calls["teacher"]:  # training forwards (not the reward guard's probes)
                fixed = _fusion.fixed
                _seen.append(fixed is not None and fixed.vector is None and x.shape[0] % fixed.prior["airlight"].shape[0] == 0)
            return _forward(x, *args, **kw)

        fusion.forward = spy
    _fit(module, demo_root, 2, context_side=64)
    assert calls["student"] and all(calls["student"]), calls["student"]
    if mode != "supervised":
        assert calls["teacher"] and all(calls["teacher"]), calls["teacher"]
    for name in calls:
        calls[name].clear()
    _fit(module, demo_root, 3)                                # no context: each crop its own, as before
    assert calls["student"] and not any(calls["student"])


@pytest.mark.parametrize("mode", ["all_pairs", "pair"])
def test_preference_modes_and_independent_crops_run(demo_root, fast_ensemble_factory, mode):
    cap = Capture()
    module = _module(fast_ensemble_factory(), pref_mode=mode, crop_windows="independent",
                     pref_start_step=0, crop_start_step=0)
    _fit(module, demo_root, 2, logger=cap)
    last = cap.rows[max(cap.rows)]
    assert last["stage3/pref"] > 0 and last["stage3/crop"] >= 0 and math.isfinite(last["stage3/total"])


def test_quantile_level_rule_spreads_pseudo_label_levels(demo_root, fast_ensemble_factory):
    cap = Capture()
    module = _module(fast_ensemble_factory(), level_rule="quantile", n_aug_variants=3)
    _fit(module, demo_root, 3, logger=cap)
    assert module.ensemble.level_thresholds.numel() == 7
    last = cap.rows[max(cap.rows)]
    used = [q for q in range(8) if last[f"stage3/pl_level_{q}"] > 0]
    assert len(used) >= 3, used


def test_relative_levels_rank_each_target_below_its_own_image_best():
    from qualiteacher.training.stage3_steps import relative_levels

    # image 0 scores high on content, image 1 low: absolute rules would put all of image 1 below image 0
    scores = torch.tensor([0.90, 0.85, 0.80, 0.55, 0.50, 0.42, 0.20, float("nan")])
    owner = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    levels = relative_levels(scores, owner, top=7)
    assert levels[0] == 7 and levels[4] == 7                 # each image's best is the top level
    assert levels[7] == -1                                   # unscorable
    drops = torch.tensor([0.05, 0.10, 0.35, 0.08, 0.30])     # the others' drops below their best
    below = levels[[1, 2, 3, 5, 6]]
    assert (below < 7).all() and (below >= 0).all()
    order = drops.argsort(stable=True)
    assert (below[order].diff() <= 0).all()                  # a larger drop never gets a higher level
    assert below.max() == 6 and below.min() <= 2             # spread over the levels below the top


def test_relative_drop_levels_fall_in_proportion_to_the_drop():
    from qualiteacher.training.stage3_steps import relative_levels

    # image 0: its best, a near-copy (another view) and variants of growing damage; image 1 alike
    scores = torch.tensor([0.80, 0.799, 0.70, 0.60, 0.50, 0.40, 0.399, 0.30, 0.10, float("nan")])
    owner = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    by_drop = relative_levels(scores, owner, top=7, spread="drop")
    by_rank = relative_levels(scores, owner, top=7, spread="rank")
    assert by_drop[0] == 7 and by_drop[5] == 7 and by_drop[9] == -1
    assert by_drop[1] == 6 and by_drop[6] == 6               # a near-copy stays next to the top
    assert min(by_rank[1], by_rank[6]) < 6                   # ... where ranking alone pushes one down
    drops = torch.tensor([0.001, 0.10, 0.20, 0.30, 0.001, 0.10, 0.30])
    below = by_drop[[1, 2, 3, 4, 6, 7, 8]]
    assert (below[drops.argsort(stable=True)].diff() <= 0).all()   # a larger drop never gets a higher level
    assert below.min() == 0 and (below >= 0).all() and (below < 7).all()
    assert by_drop[2] == by_drop[7]                          # the same drop, the same level, whichever image


@pytest.mark.parametrize("rule", ["relative", "relative_drop"])
def test_relative_level_rule_trains_and_spreads_levels(rule, demo_root, fast_ensemble_factory):
    cap = Capture()
    module = _module(fast_ensemble_factory(), level_rule=rule, n_aug_variants=3)
    _fit(module, demo_root, 3, logger=cap)
    last = cap.rows[max(cap.rows)]
    used = [q for q in range(8) if last[f"stage3/target_level_{q}"] > 0]  # the levels trained at this step
    assert 7 in used and len(used) >= 3, used


def test_unet_student_and_cond_mode_adaln(demo_root, fast_ensemble_factory):
    for kw in ({"student": "unet"}, {"cond_mode": "adaln"}):
        cap = Capture()
        module = _module(fast_ensemble_factory(), **kw)
        _fit(module, demo_root, 3, logger=cap)
        assert all(math.isfinite(v) for v in cap.rows[max(cap.rows)].values())


def test_checkpoint_keeps_bank_and_teacher_but_not_the_ensemble(demo_root, fast_ensemble_factory, tmp_path):
    module = _module(fast_ensemble_factory())
    trainer = _fit(module, demo_root, 2, tmp_path)
    path = tmp_path / "s3.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert not any(k.startswith("ensemble.") for k in ckpt["state_dict"])
    assert any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert set(ckpt["pseudo_label_bank"]["entries"]) == set(module.bank.entries)
    # resume: the bank comes back and training continues to the new max_steps
    fresh = _module(fast_ensemble_factory())
    trainer2 = _fit(fresh, demo_root, 4, tmp_path, ckpt=str(path))
    assert trainer2.global_step == 4
    assert set(fresh.bank.entries) >= set(module.bank.entries)


def test_sup_top_trains_the_top_level_on_the_paired_data(demo_root, fast_ensemble_factory):
    from qualiteacher.training.stage3_steps import supervised_loss
    from qualiteacher.training.students import build_student

    torch.manual_seed(0)
    student = build_student("iqpir", "tiny")
    student.conditioning.add.embedding.weight.data.normal_()  # a trained dial: the levels differ
    gt = torch.rand(2, 3, 32, 32)
    labeled = {"lq": gt.clone(), "gt": gt}  # two clean -> clean pairs
    loss, _ = supervised_loss(student, labeled, level=7)  # L_sup_top
    expected = torch.nn.functional.l1_loss(student(gt, torch.full((2,), 7)).image, gt)
    assert torch.allclose(loss, expected)
    loss.backward()
    grad = student.conditioning.add.embedding.weight.grad
    assert grad[7].abs().sum() > 0 and grad[:7].abs().sum() == 0  # the top level's embedding, no other

    cap = Capture()  # in a run: logged, finite, and absent when its weight is 0
    _fit(_module(fast_ensemble_factory(), w_sup_top=1.0), demo_root, 3, logger=cap)
    assert all(math.isfinite(r["stage3/sup_top"]) and r["stage3/sup_top"] > 0 for r in cap.rows.values())
    cap0 = Capture()
    _fit(_module(fast_ensemble_factory()), demo_root, 1, logger=cap0)
    assert not any("stage3/sup_top" in r for r in cap0.rows.values())


def test_bad_config_values_fail_early(fast_ensemble_factory):
    with pytest.raises(ValueError, match="w_sup_top"):
        _module(fast_ensemble_factory(), w_sup_top=-1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        _module(fast_ensemble_factory(), ema_decay=2.0)
    with pytest.raises(ValueError, match="low_levels"):
        _module(fast_ensemble_factory(), low_levels=(4, 9))
    with pytest.raises(ValueError, match="views"):
        _module(fast_ensemble_factory(), views=("identity", "rot45"))


def test_tiled_restore_matches_untiled_when_image_fits_one_tile():
    torch.manual_seed(0)
    net = build_unet("tiny").eval()
    x = torch.rand(1, 3, 32, 32)
    whole = restore(net, x, level=7)
    tiled = restore(net, x, level=7, tile=32, overlap=8)
    assert torch.allclose(whole, tiled, atol=1e-5)


def test_tiled_apply_blends_exactly_for_pointwise_functions_and_any_size():
    x = torch.rand(2, 3, 70, 45)
    out = tiled_apply(lambda t: t * 2 + 1, x, tile=32, overlap=8, tiles_per_batch=3)
    assert out.shape == x.shape
    assert torch.allclose(out, x * 2 + 1, atol=1e-5)
    with pytest.raises(ValueError):
        tiled_apply(lambda t: t, x, tile=16, overlap=8)


def test_cosine_schedule_decays_every_group_to_zero(demo_root, fast_ensemble_factory):
    module = _module(fast_ensemble_factory(), lr_schedule="cosine", cond_lr_mult=10.0)
    trainer = _fit(module, demo_root, 4)
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 2  # backbone and conditioning, both decayed
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in opt.param_groups)
    constant = _module(fast_ensemble_factory())
    trainer = _fit(constant, demo_root, 2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_schedule"):
        _module(fast_ensemble_factory(), lr_schedule="linear")


def test_a_non_finite_gradient_skips_the_step_and_is_counted(demo_root, fast_ensemble_factory):
    module = _module(fast_ensemble_factory())
    poison = {"step": 1}

    class Poison(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == poison["step"]:
                next(p for p in pl_module.student.parameters() if p.grad is not None).grad[...] = float("nan")
                poison["before"] = [p.detach().clone() for p in pl_module.student.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "before" in poison and "after" not in poison:
                poison["after"] = [p.detach().clone() for p in pl_module.student.parameters()]

    _fit(module, demo_root, 3, callbacks=[Poison()])
    assert int(module.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(poison["before"], poison["after"]))  # that step changed nothing
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_reward_detach_by_name_or_backend_across_tasks() -> None:
    from qualiteacher.iqa.presets import build_ensemble
    from qualiteacher.training.stage3_grading import detached_members

    entries = ("physical:colourfulness", "physical:haze_density", "offline:niqe")
    assert detached_members(build_ensemble("offline", task="dehaze"), entries, "offline") == {
        "colourfulness": "detach", "haze": "detach", "niqe": "detach"}
    assert detached_members(build_ensemble("offline", task="derain"), entries, "offline")["veil"] == "detach"
    # low light has no dark-channel member: that entry is skipped, the others apply
    assert set(detached_members(build_ensemble("offline", task="lowlight"), entries, "offline")) == {"colourfulness", "niqe"}
    with pytest.raises(ValueError, match="nope"):
        detached_members(build_ensemble("offline", task="dehaze"), ("nope",), "offline")


@pytest.mark.parametrize("task", ["dehaze", "derain", "desnow", "lowlight"])
def test_demo_preset_reward_detach_fits_every_task(task) -> None:
    from pathlib import Path

    import yaml

    from qualiteacher.iqa.presets import build_ensemble
    from qualiteacher.training.stage3_grading import detached_members

    model = yaml.safe_load((Path(__file__).parents[2] / "configs/presets/demo.yaml").read_text())["stage3"]["model"]
    detached = detached_members(build_ensemble("offline", task=task), tuple(model["reward_detach"]), "offline")
    # the colour members grade without a gradient: theirs painted blue skies beige (docs/results.md)
    assert {"colourfulness", "niqe", "hue_naturalness", "chroma_spread", "chroma_noise", "colour_cast"} <= set(detached)


# ------------------------------------------------------------------------------ settings groups
def _flat_arguments() -> set[str]:
    import inspect

    return set(inspect.signature(QualiTeacherModule.__init__).parameters) - {"self", "ensemble"}


def test_every_flat_argument_has_exactly_one_place_in_the_groups():
    import dataclasses

    from qualiteacher.training.stage3_settings import _GROUPS, FLAT_KEYS

    assert set(FLAT_KEYS) == _flat_arguments()
    fields = {(g, f.name) for g, cls in _GROUPS.items() for f in dataclasses.fields(cls) if not (g == "" and f.name in _GROUPS)}
    assert sorted(FLAT_KEYS.values()) == sorted(fields)  # every field fed, none twice


def test_the_module_reads_typed_groups_built_from_its_flat_arguments():
    from torch import nn

    from qualiteacher.training.stage3_settings import Stage3Settings

    module = QualiTeacherModule(preset="tiny", student="unet", ensemble=nn.Identity(), pref_beta=6.0, pref_lambda=2.0,
                                w_crop=0.3, bank_k=2, views=["identity", "hflip"], betas=[0.8, 0.99], lr=2e-4)
    s = module.settings
    assert (s.preference.beta, s.preference.lam, s.weights.crop, s.teacher.bank_k) == (6.0, 2.0, 0.3, 2)
    assert s.teacher.views == ("identity", "hflip") and s.optim.betas == (0.8, 0.99) and s.optim.lr == 2e-4
    assert s.student.kind == "unet" and s.top_level == 7
    flat = s.to_flat()
    assert set(flat) == _flat_arguments() and Stage3Settings.from_flat(flat) == s  # a round trip
    # a baseline's groups have what it leaves out switched off, whatever the flat values say
    mt = QualiTeacherModule(preset="tiny", student="unet", ensemble=nn.Identity(), mode="mean_teacher", w_pref=1.0,
                            n_aug_variants=2).settings
    assert (mt.weights.pref, mt.weights.crop, mt.teacher.n_aug_variants) == (0.0, 0.0, 0)
    assert module.hparams["views"] == ["identity", "hflip"]  # the hyper-parameters stay as given (flat)
    with pytest.raises(ValueError, match="mode"):
        QualiTeacherModule(preset="tiny", student="unet", ensemble=nn.Identity(), mode="fancy")


def test_lightning_cli_parses_the_flat_keys_into_buildable_settings():
    from qualiteacher.pipeline.sections import stage_parser
    from qualiteacher.training.stage3_settings import Stage3Settings

    parser = stage_parser(QualiTeacherModule)
    data = {"labeled_root": "L"}
    ns = parser.parse_object({"model": {"pref_beta": 6, "low_levels": [3, 5], "views": ["identity"],
                                        "reward_detach": ["physical:colourfulness"]}, "data": data})
    s = Stage3Settings.from_flat({k: v for k, v in ns.model.as_dict().items() if k != "ensemble"})
    assert s.preference.beta == 6 and s.preference.low_levels == (3, 5) and s.teacher.views == ("identity",)
    assert s.grading.reward_detach == ("physical:colourfulness",)
    with pytest.raises(Exception, match="pref_betta"):
        parser.parse_object({"model": {"pref_betta": 6}, "data": data})


def test_load_trained_reads_a_checkpoint_with_flat_hyper_parameters(tmp_path):
    """A checkpoint written before the settings were grouped: its hyper-parameters are the flat
    constructor arguments (lists where YAML gave lists, some keys absent: an older version's)."""
    from torch import nn

    from qualiteacher.training.stage3 import load_trained

    old_flat = {"student": "unet", "preset": "tiny", "cond_mode": "add", "init_from": "/gone/stage2/final.ckpt",
                "iqa_preset": "offline", "task": "dehaze", "lr": 5e-4, "betas": [0.9, 0.999], "ema_decay": 0.999,
                "bank_k": 2, "views": ["identity", "hflip", "vflip", "rot90"], "n_aug_variants": 2,
                "w_pref": 0.5, "pref_mode": "pair", "pref_beta": 6.0, "pref_delta": 0.2, "pref_lambda": 1.0,
                "pref_lambda2": 0.5, "low_levels": [4, 5, 6], "top_level": 7, "crop_windows": "aligned",
                "mask_block": 144, "mode": "qualiteacher", "reward_detach": ["physical:colourfulness"]}
    torch.manual_seed(0)
    like = QualiTeacherModule(student="unet", preset="tiny", bank_k=2, ensemble=nn.Identity())
    state = {k: v + 0.01 if k.startswith(("student.", "teacher.")) else v for k, v in like.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": old_flat, "global_step": 7,
                "pseudo_label_bank": like.bank.state_dict()}, tmp_path / "old.ckpt")
    module = load_trained(tmp_path / "old.ckpt")
    s = module.settings
    assert (s.preference.beta, s.preference.delta, s.weights.pref, s.teacher.bank_k) == (6.0, 0.2, 0.5, 2)
    assert s.preference.low_levels == (4, 5, 6) and s.optim.betas == (0.9, 0.999) and s.student.init_from is None
    assert s.grading.reward_detach == ("physical:colourfulness",) and s.grading.task == "dehaze"
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items() if k.startswith(("student.", "teacher.")))
    assert module.hparams["pref_beta"] == 6.0 and int(module.hparams.get("top_level", 7)) == 7  # read so elsewhere


def test_colour_jitter_like_gives_each_target_its_images_jitter():
    import kornia.augmentation as K

    from qualiteacher.training.stage3_steps import colour_jitter_like, strong_photometric

    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 0.6 + 0.2
    owner = torch.tensor([0, 1, 1, 3, 2, 0])
    colour_only = K.AugmentationSequential(K.ColorJitter(0.3, 0.3, 0.3, 0.0, p=0.5))
    x_s = colour_only(x).clamp(0, 1)
    drew = colour_only._params[0].data["batch_prob"].bool()
    assert drew.any() and not drew.all()  # seeded: some images jittered, some not
    assert torch.allclose(colour_jitter_like(colour_only, x[owner], owner), x_s[owner], atol=1e-6)
    untouched = ~drew[owner]
    assert torch.equal(colour_jitter_like(colour_only, x[owner], owner)[untouched], x[owner][untouched])
    # the strong view: the targets get its colour jitter only (no blur, sharpening or posterize)
    strong = strong_photometric(1.0)
    strong(x)
    jittered = colour_jitter_like(strong, x[owner], owner)
    want = strong[0](x, params=strong._params[0].data).clamp(0, 1)[owner]
    assert torch.allclose(jittered, want, atol=1e-6) and not torch.allclose(jittered, x[owner], atol=1e-3)
    sharp = K.AugmentationSequential(K.RandomSharpness(0.5, p=1.0))
    sharp(x)
    with pytest.raises(TypeError, match="colour jitter"):
        colour_jitter_like(sharp, x, owner)


@pytest.mark.parametrize("on_target", [False, True])
def test_strong_aug_target_puts_the_colour_jitter_on_the_pseudo_labels(demo_root, fast_ensemble_factory,
                                                                         on_target, monkeypatch):
    from qualiteacher.training import stage3_steps

    seen = []
    jitter_like = stage3_steps.colour_jitter_like
    monkeypatch.setattr(stage3_steps, "colour_jitter_like",
                        lambda p, images, owner: seen.append(images.shape[0]) or jitter_like(p, images, owner))
    module = _module(fast_ensemble_factory(), strong_aug_p=1.0, strong_aug_target=on_target)
    assert module.settings.student.strong_aug_target is on_target
    _fit(module, demo_root, 2)
    assert (len(seen) == 2 and all(n >= 2 for n in seen)) if on_target else not seen
