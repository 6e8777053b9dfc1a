"""Semantic IQA member on an open_clip model.

Two scores, both softmax over prompt similarities at a fixed logit scale (default 100):

- ``antonym`` (CLIP-IQA): P("Good photo." | image) against "Bad photo.", higher = better.
- ``degradation`` (METHOD.md §2): ``c = 1 - P(degraded)``, softmax over a clean prompt and the
  task's degradation prompts (hazy / rainy / snowy / dark); higher = better.

Preprocessing is done in torch with the model's own constants (resize the shorter side to the
model's image size, centre crop, normalise with its mean/std), so the score is batched and
differentiable with respect to the input. Only the vision tower is kept; the prompt embeddings are
computed once and stored as a non-persistent buffer.
"""

from __future__ import annotations

import os
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.iqa.members import MissingWeightsError, downloads_allowed

ANTONYM_PROMPTS = ("Good photo.", "Bad photo.")
CLEAN_PROMPT = "a clean, clear photo."
DEGRADATION_PROMPTS: dict[str, tuple[str, ...]] = {
    "dehaze": ("a hazy photo.", "a foggy photo."),
    "derain": ("a rainy photo.", "a photo with rain streaks."),
    "desnow": ("a snowy photo.", "a photo with falling snow."),
    "lowlight": ("a dark photo.", "an underexposed photo taken at night."),
    "generic": ("a blurry photo.", "a noisy photo.", "a degraded photo."),
}
ClipMode = Literal["antonym", "degradation"]


def clip_prompts(mode: ClipMode, task: str | None) -> tuple[tuple[str, ...], int]:
    """Prompts and how many of them (from the front) count as "good"."""
    if mode == "antonym":
        return ANTONYM_PROMPTS, 1
    if mode != "degradation":
        raise ValueError(f"clip member mode must be 'antonym' or 'degradation', got {mode!r}")
    key = task or "generic"
    if key not in DEGRADATION_PROMPTS:
        raise ValueError(f"no degradation prompts for task {task!r}; known: {sorted(DEGRADATION_PROMPTS)}")
    return (CLEAN_PROMPT, *DEGRADATION_PROMPTS[key]), 1


def weights_need_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip's pretrained tag ``pretrained`` was trained with QuickGELU (OpenAI's CLIP
    weights were, e.g. ``ViT-B-32`` / ``openai``), while a plain model config builds GELU. False
    for random weights, local files (their activation cannot be read from them) and
    ``-quickgelu`` model names (their config has it already)."""
    import open_clip  # lazy: open_clip takes 4 s to import; only the CLIP member needs it

    if not pretrained or os.path.isfile(pretrained) or model_name.endswith("-quickgelu"):
        return False
    return bool((open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("quick_gelu", False))


def load_open_clip(model_name: str, pretrained: str | None, member_name: str = "clip",
                   quick_gelu: bool | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from open_clip; a tag downloads, a file path loads locally.

    ``quick_gelu``: build the model with QuickGELU; ``None`` follows the tag
    (:func:`weights_need_quick_gelu`), so OpenAI's weights run with the activation they were
    trained with. Give ``True`` for a local file of OpenAI weights under a plain model name.
    A missing local file or a failed/disabled download raises ``MissingWeightsError``.
    """
    import open_clip  # lazy: open_clip, see load_open_clip

    if quick_gelu is None:
        quick_gelu = weights_need_quick_gelu(model_name, pretrained)
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not os.path.isfile(pretrained):
            raise MissingWeightsError(member_name, os.path.basename(pretrained), pretrained,
                                      "Give an existing open_clip checkpoint (state dict of the model).")
    if pretrained and not os.path.isfile(pretrained) and not downloads_allowed():
        pretrained = _cached_open_clip_file(model_name, pretrained, member_name)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, device="cpu",
                                       force_quick_gelu=bool(quick_gelu))
    except Exception as err:  # hub / network / file errors
        if not pretrained:
            raise
        raise MissingWeightsError(
            member_name,
            f"open_clip {model_name} / {pretrained}",
            "the Hugging Face cache ($HF_HOME/hub), or a local file given as the member's `pretrained`",
            f"open_clip could not load it ({type(err).__name__}: {str(err)[:200]}). Without internet use "
            "the offline preset instead: build_ensemble('offline', task=...).",
        ) from None
    return model, open_clip.get_tokenizer(model_name)


def _cached_open_clip_file(model_name: str, tag: str, member_name: str) -> str:
    """Local Hugging Face cache file of an open_clip pretrained tag, without touching the network."""
    import open_clip  # lazy: open_clip, see load_open_clip

    # lazy: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE once, when first imported
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if "file" in cfg:
        return cfg["file"]
    if not cfg.get("hf_hub"):
        raise MissingWeightsError(member_name, f"open_clip {model_name} / {tag}", "(no Hugging Face entry)",
                                  "Downloads are disabled; give a local checkpoint path as `pretrained`.")
    repo_id, file_name = os.path.split(cfg["hf_hub"])
    names = [n for n in (file_name, "open_clip_model.safetensors", "open_clip_pytorch_model.bin") if n]
    for name in names:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):
            return hit
    raise MissingWeightsError(
        member_name, f"{repo_id}/{names[0]}", f"the Hugging Face cache ($HF_HOME/hub) as {repo_id}/{names[0]}",
        "Downloads are disabled (QUALITEACHER_OFFLINE/HF_HUB_OFFLINE). Give a local checkpoint path as the "
        "member's `pretrained`, or use the offline preset: build_ensemble('offline', task=...).",
    )


class ClipMember(nn.Module):
    """Probability mass of the "good" prompts, (B, 3, H, W) in [0, 1] -> (B,) in [0, 1]."""

    tolerates_bf16 = True  # a network: the ensemble may run it in bf16 + channels_last (low_precision)

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object,
        prompts: Sequence[str],
        num_good: int = 1,
        logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        import open_clip  # lazy: open_clip, see load_open_clip

        self.visual = model.visual
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            text = model.encode_text(tokenizer(list(prompts)))
        self.register_buffer("text_features", F.normalize(text.float(), dim=-1), persistent=False)
        self.prompts = tuple(prompts)
        self.num_good = int(num_good)
        self.logit_scale = float(logit_scale)

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize shorter side to the model size (bicubic, antialiased), centre crop, normalise."""
        th, tw = self.image_size
        h, w = images.shape[-2:]
        scale = max(th / h, tw / w)
        size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - th) // 2, (size[1] - tw) // 2
        x = x[..., top : top + th, left : left + tw]
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        feats = F.normalize(self.visual(self.preprocess(images)).float(), dim=-1)  # (B, D)
        probs = (self.logit_scale * feats @ self.text_features.t()).softmax(-1)  # (B, P)
        return probs[:, : self.num_good].sum(-1)
