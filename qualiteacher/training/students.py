"""Building students by name and loading warmed-up weights into them."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def build_student(kind: str, preset: str, cond_mode: str = "add") -> nn.Module:
    """``iqpir`` (codebook student with the discrete quality path) or ``unet`` (plug-in conditioned U-Net)."""
    from qualiteacher.archs.presets import build_iqpir, build_unet

    if kind == "iqpir":
        return build_iqpir(preset, cond_mode=cond_mode)
    if kind == "unet":
        return build_unet(preset)
    raise ValueError(f"unknown student {kind!r}; choose 'iqpir' or 'unet'")


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (or a bare state dict), with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (run the previous stage first, or "
                                f"pass the right path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # corrupt or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    return ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt


def load_student_weights(student: nn.Module, path: str | Path, prefix: str = "student.") -> None:
    """Load the ``student.*`` weights of a stage checkpoint into ``student`` (strict)."""
    state = read_checkpoint_state(path)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(f"{path} holds no '{prefix}*' weights: is it a stage-2 / warm-up checkpoint?")
    own = student.state_dict()
    missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
    if missing or unexpected:
        cond = [k for k in missing + unexpected if "conditioning" in k or ".ada." in k]
        hint = (" The conditioning differs: stage 2 and stage 3 must use the same cond_mode (add / adaln)."
                if cond else " Are student, preset and cond_mode those the checkpoint was trained with?")
        raise ValueError(f"{path} does not fit this student: {len(missing)} missing weight(s) "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).{hint}")
    student.load_state_dict(sub, strict=True)
