"""Numerics that mixed precision and pretrained weights depend on: the nearest-code search stays in
float32 under bf16 autocast; OpenAI's CLIP weights get the QuickGELU activation they were trained with."""
import pytest
import torch
from torch import nn

from qualiteacher.archs.quantize import VectorQuantizer, nearest_code


def _codebook_and_features():
    # the paper's latent: 256 channels, 1,024 codes spread like a trained codebook's
    torch.manual_seed(0)
    vq = VectorQuantizer(1024, 256)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    return vq, torch.randn(2, 256, 16, 16)


def test_nearest_code_is_float32_under_bf16_autocast():
    vq, z = _codebook_and_features()
    flat, codes = z.permute(0, 2, 3, 1).reshape(-1, 256), vq.embedding.weight.detach()
    reference = nearest_code(flat, codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # what the search gave before: autocast runs the matrix product in bf16 despite .float()
        naive = torch.addmm(codes.float().pow(2).sum(1)[None], flat.float(), codes.float().t(), alpha=-2.0)
        naive = (naive + flat.float().pow(2).sum(1, keepdim=True)).argmin(1)
        guarded = nearest_code(flat, codes)
    assert (naive != reference).float().mean() > 0.01   # the data is sensitive to bf16
    assert torch.equal(guarded, reference)


def test_quantizer_indices_do_not_depend_on_autocast():
    vq, z = _codebook_and_features()
    reference = vq(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert torch.equal(out.indices, reference)


def _activations(model: nn.Module) -> set[type]:
    from open_clip.transformer import QuickGELU

    return {type(m) for m in model.visual.modules() if isinstance(m, (nn.GELU, QuickGELU))}


@pytest.fixture
def small_architecture(tmp_path, monkeypatch):
    """open_clip.create_model builds a 1-layer ViT instead of the named one, with the same
    arguments (nothing can be downloaded here); returns the calls it saw."""
    import json

    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "qt-numerics-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    real, calls = open_clip.create_model, []

    def build(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        return real("qt-numerics-clip", pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", build)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: open_clip.tokenize)
    return calls


@pytest.mark.parametrize("name,tag,quick", [("ViT-B-32", "openai", True), ("ViT-B-32", "laion2b_s34b_b79k", False),
                                            ("ViT-B-32-quickgelu", "openai", False), ("ViT-B-32", None, False)])
def test_clip_activation_matches_what_the_weights_were_trained_with(name, tag, quick, small_architecture,
                                                                     monkeypatch):
    from open_clip.transformer import QuickGELU

    from qualiteacher.iqa import clip_member

    # open_clip's own registry says which weights were trained with QuickGELU
    assert clip_member.weights_need_quick_gelu(name, tag) is quick
    monkeypatch.setattr(clip_member, "downloads_allowed", lambda: True)
    model, _ = clip_member.load_open_clip(name, tag)
    assert small_architecture[0][:2] == (name, tag)
    assert _activations(model) == ({QuickGELU} if quick else {nn.GELU})


def test_quick_gelu_can_be_forced_for_a_local_file(small_architecture):
    from open_clip.transformer import QuickGELU

    from qualiteacher.iqa import clip_member

    model, _ = clip_member.load_open_clip("ViT-B-32", None, quick_gelu=True)
    assert _activations(model) == {QuickGELU}
