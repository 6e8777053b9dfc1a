"""Building students by name and loading warmed-up weights into them."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qualiteacher
from qualiteacher.archs.presets import build_iqpir, build_unet
from qualiteacher.checkpoints import checkpoint_state, read_checkpoint

FORMAT = "qualiteacher-student/1"  # the JSON description of a student (``student_spec``)
# hyper-parameters of the stage-3 module that describe how the student is built
_BUILD_KEYS = ("student", "preset", "cond_mode", "adain", "fidelity_w", "fusion_prior")


def build_student(kind: str, preset: str, cond_mode: str = "add", adain: bool = False,
                  fidelity_w: float = 1.0, fusion_prior: str | None = None) -> nn.Module:
    """``iqpir`` (codebook student with the discrete quality path and, when the preset has fusion
    scales, the fidelity path at default ``fidelity_w``, its image-level fusion reading the
    classical restorer ``fusion_prior``) or ``unet`` (plug-in conditioned U-Net)."""
    if kind == "iqpir":
        return build_iqpir(preset, cond_mode=cond_mode, adain=adain, default_w=fidelity_w, prior=fusion_prior)
    if kind == "unet":
        return build_unet(preset)
    raise ValueError(f"unknown student {kind!r}; choose 'iqpir' or 'unet'")


def student_spec(hparams: dict[str, Any]) -> dict[str, Any]:
    """The JSON description of a stage-3 module's student (from its hyper-parameters): what
    :func:`build_student` needs (``build``), its top level, task and IQA preset, and the versions
    that wrote it. The registered model stores it; ``load_for_inference`` builds from it."""
    build = {k: hparams[k] for k in _BUILD_KEYS if k in hparams}
    build.setdefault("student", "iqpir")
    return {"format": FORMAT, "build": build, "top_level": int(hparams.get("top_level", 7)),
            "task": hparams.get("task"), "iqa_preset": hparams.get("iqa_preset"),
            "versions": {"qualiteacher": qualiteacher.__version__, "torch": release(torch.__version__)}}


def release(version: str) -> str:
    """A package version without its local build tag: ``2.14.1+cu128`` -> ``2.14.1``."""
    return version.split("+", 1)[0]


def untrained_student_outputs(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The unconditioned output of a random-init ``iqpir`` student (``tiny`` preset): the IQA
    audit's ``untrained_student`` pairs (``iqa.audit.run_audit(student_outputs=...)``)."""
    # lazy: import cycle training.students -> training.restore -> training.students
    from qualiteacher.training.restore import restore

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_student("iqpir", "tiny")
    return restore(net, images, level=None).clamp(0, 1)


def trained_student_outputs(checkpoint: str | Path, level: int | None = None, tile: int = 48
                            ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The IQA audit's ``trained_student`` pairs: the student of a stage-3 ``checkpoint`` (read
    safely) restoring each clean photo at ``level`` (default: its top level), tiled like the
    pipeline's eval. The checkpoint is read here, so a bad path fails before any scoring."""
    from qualiteacher.training.restore import load_for_inference, restore  # lazy: see untrained_student_outputs

    module = load_for_inference(checkpoint)
    top = int(module.hparams.get("top_level", 7)) if level is None else level

    def outputs(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        del seed  # deterministic
        with torch.no_grad():
            return restore(module.student, images, level=top, tile=tile).clamp(0, 1)

    return outputs


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (or a bare state dict), read safely
    (``weights_only``: tensors and plain data only; see ``qualiteacher.checkpoints``), with
    ``torch.compile`` prefixes removed. Problems raise ``CheckpointError`` (a ``ValueError``)."""
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path} (run the previous stage first, or "
                                f"pass the right path)")
    return checkpoint_state(read_checkpoint(path), path)


def load_student_weights(student: nn.Module, path: str | Path, prefix: str = "student.",
                         allow_missing: tuple[str, ...] = (), keep_own: tuple[str, ...] = ()) -> None:
    """Load the ``student.*`` weights of a stage checkpoint into ``student`` (strict, except that
    weights under the ``allow_missing`` prefixes may be absent and those under ``keep_own`` are
    not read: both keep their current values)."""
    state = read_checkpoint_state(path)
    sub = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and not (keep_own and k[len(prefix):].startswith(keep_own))}
    if not sub:
        raise ValueError(f"{path} holds no '{prefix}*' weights: is it a stage-2 / warm-up checkpoint?")
    own = student.state_dict()
    for k in own:
        if k not in sub and k.startswith(allow_missing + keep_own):
            sub[k] = own[k]
    missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
    if missing and all(k.startswith("fidelity.") for k in missing):
        raise ValueError(f"{path} predates IQPIR's fidelity path (it has no fusion blocks, "
                         f"{len(missing)} 'fidelity.*' weights missing): retrain it with the current "
                         f"pipeline (stages 2, fidelity, 3), or use an architecture preset without "
                         f"fidelity_scales")
    if missing or unexpected:
        cond = [k for k in missing + unexpected if "conditioning" in k or ".ada." in k]
        hint = (" The conditioning differs: stage 2 and stage 3 must use the same cond_mode (add / adaln)."
                if cond else " Are student, preset and cond_mode those the checkpoint was trained with?")
        raise ValueError(f"{path} does not fit this student: {len(missing)} missing weight(s) "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).{hint}")
    student.load_state_dict(sub, strict=True)
