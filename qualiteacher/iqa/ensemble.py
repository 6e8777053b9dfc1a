"""The NR-IQA ensemble: member scores, fused score, quality level, reward and reliability mask."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from qualiteacher.iqa.guards import fuse_available, guarded_scores, member_domain, worst_raw_score
from qualiteacher.iqa.members import (
    MemberSpec,
    default_level,
    fit_quantile_levels,
    normalize_score,
    quantile_level,
    total_weight_is_positive,
)


class EnsembleScores(NamedTuple):
    raw: dict[str, Tensor]  # member name -> (B,)
    normalized: dict[str, Tensor]  # member name -> (B,) in [0, 1], higher = better
    fused: Tensor  # (B,)
    level: Tensor  # (B,) long, 0..7


def upsample_to_min_side(images: Tensor, min_size: int) -> Tensor:
    """Bilinear upsampling so the shorter side is at least ``min_size`` (aspect ratio kept)."""
    h, w = images.shape[-2:]
    if min(h, w) >= min_size:
        return images
    scale = min_size / min(h, w)
    size = (max(min_size, math.ceil(h * scale)), max(min_size, math.ceil(w * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def specs_version(specs: Sequence[MemberSpec]) -> str:
    """Short hash of the member specs (cache key: scores change when a spec changes)."""
    blob = json.dumps([s.to_dict() for s in specs], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class Ensemble(nn.Module):
    """Frozen, always-eval ensemble of IQA members (build it with ``presets.build_ensemble``).

    ``members`` maps each spec's name to a module ``(B, 3, H, W) in [0, 1] -> (B,) raw score``.
    Members run in float32 with autocast disabled, on whatever device the images are on. Images
    smaller than a member's ``min_size`` (spec option, else the module's ``min_size``) are upsampled
    bilinearly to it. The ensemble's tensors are left out of ``state_dict`` (they come from the
    presets, not from training) and loading a parent's state dict keeps them as they are.
    ``random_members`` names members built with stand-in (random) weights: then every score is
    meaningless (``meaningless``) and ``version`` ends in ``-random`` so no cache mixes them up.
    """

    def __init__(self, specs: Sequence[MemberSpec], members: Mapping[str, nn.Module], task: str | None = None,
                 random_members: Sequence[str] = ()) -> None:
        super().__init__()
        specs = list(specs)
        total_weight_is_positive(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names) or set(names) != set(members):
            raise ValueError(f"member names {names} must be unique and match the modules {sorted(members)}")
        if not set(random_members) <= set(names):
            raise ValueError(f"random_members {list(random_members)} are not all members of {names}")
        self.specs = tuple(specs)
        self.task = task
        self.random_members = tuple(random_members)
        self.low_precision = False  # True: members with ``tolerates_bf16`` run in bf16 (stage 3's iqa_bf16)
        self.members = nn.ModuleDict({s.name: members[s.name] for s in specs})
        self.register_buffer("level_thresholds", torch.empty(0), persistent=False)
        self._register_state_dict_hook(_drop_own_state)
        self._register_load_state_dict_pre_hook(_keep_own_state, with_module=True)

    @property
    def version(self) -> str:
        return specs_version(self.specs) + ("-random" if self.meaningless else "")

    @property
    def meaningless(self) -> bool:
        """True when a member runs on stand-in (random) weights: its scores are plumbing only."""
        return bool(self.random_members)

    @property
    def reward_is_fused(self) -> bool:
        """True when ``reward`` equals the fused score (no ``exclude`` member): same scale."""
        return all(s.reward_mode != "exclude" for s in self.specs)

    @property
    def weights(self) -> dict[str, float]:
        return {s.name: s.weight for s in self.specs}

    def train(self, mode: bool = True) -> "Ensemble":
        return super().train(False)  # IQA members never leave eval mode

    # ----------------------------------------------------------------------------- scoring
    def _raw_score(self, spec: MemberSpec, images: Tensor) -> Tensor:
        module = self.members[spec.name]
        min_size = int(spec.options.get("min_size", getattr(module, "min_size", 0)))

        low = self.low_precision and getattr(module, "tolerates_bf16", False)

        def score(x: Tensor) -> Tensor:
            if low:  # a network that keeps its judgement in bf16: autocast and channels_last
                x = upsample_to_min_side(x.float().clamp(0, 1), min_size).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                    return module(x).float().reshape(-1)
            with torch.autocast(device_type=x.device.type, enabled=False):
                return module(upsample_to_min_side(x.float().clamp(0, 1), min_size)).float().reshape(-1)

        # each member judges only its own domain: NaN (unscorable) or its worst score elsewhere (guards.py)
        norm = spec.normalization
        worst = worst_raw_score(norm.lo, norm.hi, spec.higher_better) if norm.kind == "range" else None
        return guarded_scores(score, images, member_domain(spec.kind, module), worst, spec.name)

    def _normalize(self, spec: MemberSpec, raw: Tensor) -> Tensor:
        return normalize_score(raw, spec.normalization, spec.higher_better)

    def forward(self, images: Tensor) -> EnsembleScores:
        """Scores of a batch (B, 3, H, W) in [0, 1], without gradients."""
        _check_images(images)
        with torch.no_grad():
            raw = {s.name: self._raw_score(s, images) for s in self.specs}
            normalized = {s.name: self._normalize(s, raw[s.name]) for s in self.specs}
            fused = fuse_available(normalized, self.weights)
        return EnsembleScores(raw, normalized, fused, self.level_of(fused))

    scores = forward

    def reward(self, images: Tensor) -> Tensor:
        """Fused score (B,) with gradients through members whose ``reward_mode`` is ``grad``.

        ``detach`` members add their score as a constant, ``exclude`` members are left out (the
        remaining weights are renormalised). The members' own parameters never get gradients.
        """
        _check_images(images)
        normalized: dict[str, Tensor] = {}
        for spec in self.specs:
            if spec.reward_mode == "exclude":
                continue
            ctx = nullcontext() if spec.reward_mode == "grad" else torch.no_grad()
            with ctx:
                normalized[spec.name] = self._normalize(spec, self._raw_score(spec, images))
        if not normalized:
            raise ValueError("reward: every member has reward_mode 'exclude'")
        # an output no member can judge gets the worst reward (0), a defined value without gradient
        return torch.nan_to_num(fuse_available(normalized, self.weights), nan=0.0)

    # ----------------------------------------------------------------------------- levels
    def level_of(self, fused: Tensor) -> Tensor:
        """Quality level (B,) long: the default rule, or the fitted quantile thresholds if set."""
        if self.level_thresholds.numel():
            levels = quantile_level(fused, self.level_thresholds)
        else:
            levels = default_level(fused)
        return torch.where(torch.isfinite(fused), levels, torch.full_like(levels, -1))  # -1: unscorable

    def fit_levels_(self, pool_scores: Tensor) -> Tensor:
        """Switch to the quantile rule with thresholds fitted on a pool of fused scores."""
        self.level_thresholds = fit_quantile_levels(pool_scores).to(self.level_thresholds.device)
        return self.level_thresholds

    def reset_levels_(self) -> None:
        self.level_thresholds = torch.empty(0, device=self.level_thresholds.device)

    # ----------------------------------------------------------------------------- mask
    def reliability_mask(self, images: Tensor, block: int = 144) -> Tensor:
        """Per-pixel reliability (B, 1, H, W): fused scores of blocks, upsampled bilinearly.

        ``block`` is reduced to ``min(block, H, W)``. Blocks start on a regular grid of
        ``ceil(H / block)`` x ``ceil(W / block)`` positions spread from the first to the last
        possible start, so non-divisible sizes are covered with slightly overlapping blocks. All
        blocks of all images are scored in one batched call.
        """
        _check_images(images)
        b, c, h, w = images.shape
        k = min(block, h, w)
        nh, nw = math.ceil(h / k), math.ceil(w / k)
        rows = torch.linspace(0, h - k, nh, device=images.device).round().long()
        cols = torch.linspace(0, w - k, nw, device=images.device).round().long()
        patches = images.unfold(2, k, 1)[:, :, rows].unfold(3, k, 1)[:, :, :, cols]  # (B, C, nh, nw, k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * nh * nw, c, k, k)
        grid = self.forward(patches).fused.reshape(b, 1, nh, nw).nan_to_num(nan=0.0)  # unscorable block: unreliable
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------- specs I/O
    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump({"members": [s.to_dict() for s in self.specs]}, sort_keys=False))
        return path


def without_members(ensemble: Ensemble, names: Sequence[str]) -> Ensemble:
    """The ensemble minus the members ``names`` (modules shared, remaining weights renormalised by
    the fusion): training never sees a held-out member, which then checks the results."""
    have = [s.name for s in ensemble.specs]
    unknown = sorted(set(names) - set(have))
    if unknown:
        raise ValueError(f"cannot leave out {unknown}: the ensemble's members are {have}")
    specs = [s for s in ensemble.specs if s.name not in set(names)]
    if not specs:
        raise ValueError(f"cannot leave out every member {have}")
    return Ensemble(specs, {s.name: ensemble.members[s.name] for s in specs}, task=ensemble.task,
                    random_members=[n for n in ensemble.random_members if n not in set(names)]).eval()


def with_reward_modes(ensemble: Ensemble, modes: Mapping[str, str]) -> Ensemble:
    """The ensemble with the members ``modes`` names given another ``reward_mode`` (modules shared):
    e.g. ``{"colourfulness": "detach"}`` keeps a member in the grades and the reward's value but
    takes it out of the reward's gradient, so the student cannot climb it directly."""
    have = {s.name for s in ensemble.specs}
    unknown = sorted(set(modes) - have)
    if unknown:
        raise ValueError(f"cannot set the reward mode of {unknown}: the ensemble's members are {sorted(have)}")
    specs = [dataclasses.replace(s, reward_mode=modes[s.name]) if s.name in modes else s for s in ensemble.specs]
    return Ensemble(specs, dict(ensemble.members), task=ensemble.task,
                    random_members=list(ensemble.random_members)).eval()


def load_specs_yaml(path: str | Path, task: str | None = None) -> list[MemberSpec]:
    """Member specs of a YAML file: ``members:`` plus optional ``task_members: {task: [...]}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IQA member file not found: {path}")
    data: Any = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "members" not in data:
        raise ValueError(f"{path}: expected a mapping with a 'members' list")
    entries = list(data["members"])
    task_members = data.get("task_members") or {}
    if task is not None and task_members:
        if task not in task_members:
            raise ValueError(f"{path}: no task_members for task {task!r}; has {sorted(task_members)}")
        entries += list(task_members[task])
    try:
        return [MemberSpec.from_dict(e) for e in entries]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad member entry: {err}") from err


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"IQA ensemble expects images (B, 3, H, W), got {tuple(images.shape)}")


def _own_tensors(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for mod_name, mod in module.named_modules():
        base = prefix + (mod_name + "." if mod_name else "")
        for name, p in mod._parameters.items():
            if p is not None:
                out[base + name] = p.detach()
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[base + name] = buf
    return out


def _drop_own_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_own_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    state_dict.update(_own_tensors(module, prefix))
