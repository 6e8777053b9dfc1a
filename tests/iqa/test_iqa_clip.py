"""CLIP member mechanics with a tiny randomly initialised open_clip model (no quality judgement)."""
import json
from pathlib import Path

import pytest
import torch

from qualiteacher.iqa import MissingWeightsError
from qualiteacher.iqa.clip_member import ClipMember, clip_prompts, load_open_clip
from qualiteacher.iqa.members import MemberSpec, Normalization
from qualiteacher.iqa.presets import ensemble_from_specs

TINY = "qt-tiny-clip-test"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return TINY


@pytest.mark.parametrize("mode,task", [("antonym", None), ("degradation", "dehaze"), ("degradation", None)])
def test_clip_member_shapes_range_and_gradients(tiny_clip: str, mode: str, task: str | None) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_open_clip(tiny_clip, None)
    prompts, num_good = clip_prompts(mode, task)
    member = ClipMember(model, tokenizer, prompts, num_good).eval()
    assert member.text_features.shape == (len(prompts), 32)
    x = torch.rand(3, 3, 40, 56, requires_grad=True)  # non-square: resize + centre crop
    assert member.preprocess(x).shape == (3, 3, 32, 32)
    score = member(x)
    assert score.shape == (3,) and ((0 <= score) & (score <= 1)).all()
    score.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    batched = member(x.detach())
    single = torch.cat([member(x[i : i + 1].detach()) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_clip_probability_is_the_softmax_of_the_prompts(tiny_clip: str) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_open_clip(tiny_clip, None)
    prompts, num_good = clip_prompts("degradation", "derain")
    member = ClipMember(model, tokenizer, prompts, num_good, logit_scale=100.0).eval()
    x = torch.rand(2, 3, 32, 32)
    feats = torch.nn.functional.normalize(model.encode_image(member.preprocess(x)), dim=-1)
    text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(prompts))), dim=-1)
    p_degraded = (100 * feats @ text.t()).softmax(-1)[:, 1:].sum(-1)
    assert torch.allclose(member(x), 1 - p_degraded, atol=1e-5)


def test_clip_in_an_ensemble_params_frozen(tiny_clip: str) -> None:
    spec = MemberSpec("clip", "clip:degradation", 1.0, Normalization("range", 0, 1), True, True,
                      options={"model": tiny_clip, "pretrained": None})
    ens = ensemble_from_specs([spec], task="desnow")
    params = list(ens.parameters())
    assert params and all(not p.requires_grad for p in params)
    x = torch.rand(2, 3, 48, 48, requires_grad=True)
    ens.reward(x).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in params)
    assert ens.state_dict() == {}


def test_local_checkpoint_and_missing_file(tiny_clip: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, _ = load_open_clip(tiny_clip, None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    loaded, _ = load_open_clip(tiny_clip, str(ckpt))
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    with pytest.raises(MissingWeightsError, match="missing.pt"):
        load_open_clip(tiny_clip, str(tmp_path / "missing.pt"))


def test_unknown_prompt_mode_or_task() -> None:
    with pytest.raises(ValueError, match="mode"):
        clip_prompts("aesthetic", None)
    with pytest.raises(ValueError, match="no degradation prompts"):
        clip_prompts("degradation", "deblur")


def test_pretrained_tag_offline_fails_fast(monkeypatch, tmp_path: Path) -> None:
    import time

    monkeypatch.setenv("QUALITEACHER_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(MissingWeightsError, match="ViT-B-32|vit_base_patch32") as info:
        load_open_clip("ViT-B-32", "openai", "clip")
    assert time.monotonic() - start < 10 and "offline preset" in str(info.value)
