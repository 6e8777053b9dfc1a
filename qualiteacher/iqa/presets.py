"""IQA ensemble presets: an explicit dict literal (the source of truth) and the member factory.

``configs/iqa/<preset>.yaml`` mirror ``PRESETS`` (a test keeps them equal; regenerate them with
``write_preset_yaml``). Edit a copy of one and load it with ``build_ensemble_from_yaml``.

- ``paper``: the released fusion ``0.4 m + 0.2 c + 0.4 b`` (MUSIQ/100, CLIP 1 - P(degraded),
  (100 - BRISQUE)/100); pyiqa / open_clip weights are downloaded on first use or read from the
  caches (see pyiqa_adapter.py); a missing file raises ``MissingWeightsError``.
- ``offline``: no download. PIQE (pyiqa, no weights), BRISQUE with the ``brisque`` package's LIVE
  SVR, NIQE fitted on scikit-image photos (graded at the image's own size), JPEG blockiness, plus
  the task's physical member and RMS contrast, plus clipping, colourfulness and colour cast
  (audit of issue 12), plus chroma spread, chroma noise and hue naturalness (colour.py, issue 25:
  their weights chosen on the audit's tune photos, the other members fixed). ``qualiteacher iqa
  audit`` measures it on report photos it was not tuned on (docs/iqa.md: 92-93 % of the destroyed
  copies below their source; the targets of 95 % and 90 % per destruction are not reached).
  Clipping counts each pixel by 1 - its chroma (a vivid colour's empty channel is not clipping).
  Desnow's veil and low light's contrast weigh 0.3 (the blur ladder). ``offline_v5``: before those
  two weights; ``offline_v4``: before neutral clipping (2026-12-07); ``offline_v3``: before the blockiness recalibration
  (JPEG ladder, 2026-12-07); ``offline_v2``:
  the preset before issue 25; ``offline_v1``: before issue 12; kept for comparison.

Stand-in weights (plumbing tests only): with ``QUALITEACHER_RANDOM_IQA=1`` every member that needs
downloaded weights is built without them — pyiqa networks and CLIP with a seeded random
initialisation, pyiqa's BRISQUE / NIQE from the parameters shipped with the ``offline`` preset —
so the ``paper`` path runs with no file at all. Its scores are meaningless: the ensemble says so
(``Ensemble.meaningless``, a ``-random`` version, a banner on stderr) and the pipeline labels every
table and run it produces. The switch is off unless that variable is set.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from qualiteacher.iqa import offline
from qualiteacher.iqa.clip_member import ClipMember, clip_prompts, load_open_clip
from qualiteacher.iqa.ensemble import Ensemble, load_specs_yaml
from qualiteacher.iqa.members import MemberSpec
from qualiteacher.iqa.physical import PhysicalMember
from qualiteacher.iqa.pyiqa_adapter import build_pyiqa_member
from qualiteacher.iqa.pyiqa_weights import METRIC_WEIGHT_FILES, default_weight_file
from qualiteacher.tasks import TASKS

if TYPE_CHECKING:
    import pandas as pd

RANDOM_IQA_ENV = "QUALITEACHER_RANDOM_IQA"
RANDOM_IQA_SEED = 0
MEANINGLESS = "MEANINGLESS (random IQA weights, QUALITEACHER_RANDOM_IQA=1)"


def _m(name: str, backend: str, weight: float, lo: float, hi: float, higher_better: bool,
       differentiable: bool = True, reward_mode: str = "grad", **options: Any) -> dict[str, Any]:
    return {"name": name, "backend": backend, "weight": weight,
            "normalization": {"kind": "range", "lo": lo, "hi": hi},
            "higher_better": higher_better, "differentiable": differentiable,
            "reward_mode": reward_mode, "options": options}


# JPEG blockiness range: clean 96-px crops score about 0.12 (median of the audit's photos), JPEG
# q76 / 52 / 29 / 5 about 0.17 / 0.30 / 0.49 / 2.7. The old floor 0.3 scored a clean photo and
# q76 and q52 alike (all 1), so the JPEG ladder's first steps went by the other members, which
# JPEG's smoothing pleases (rho 0.82). (0.1, 1.0) was chosen on the audit's tune photos (issue 25).
BLOCKINESS_RANGE = (0.1, 1.0)
BLOCKINESS_RANGE_V3 = (0.3, 2.0)


def _audited_members(blockiness_range: tuple[float, float] = BLOCKINESS_RANGE_V3,
                     clipping_neutral: float = 0.0) -> list[dict[str, Any]]:
    """The members of ``offline_v2`` (issue 12's audit), which ``offline`` keeps and extends
    (``clipping_neutral``: the clipping member's ``neutral`` option; 0 leaves it out)."""
    clip = {"neutral": clipping_neutral} if clipping_neutral else {}
    return [
        _m("piqe", "pyiqa:piqe", 0.2, 0.0, 100.0, False, differentiable=False, reward_mode="detach"),
        _m("brisque", "offline:brisque", 0.3, 0.0, 100.0, False),
        # graded at the image's own size (blocks and pristine model follow it), no upsampling:
        # clean 48-96-px crops score about 3-9, the audit's heaviest noise / rain 13-45 (docs/iqa.md)
        _m("niqe", "offline:niqe", 0.2, 2.0, 25.0, False, native=True),
        _m("blockiness", "physical:blockiness", 0.2, *blockiness_range, False),
        # clipped channels: posterize, over-sharpening, noise texture, an untrained decoder
        _m("clipping", "physical:clipping", 0.4, 0.0, 0.1, False, **clip),
        # capped low (0.15): colour present pays, over-saturation does not
        _m("colourfulness", "physical:colourfulness", 0.2, 0.0, 0.15, True),
        _m("colour_cast", "physical:colour_cast", 0.1, 0.0, 3.0, False),
    ]


def _colour_members() -> list[dict[str, Any]]:
    """What issue 25 added to ``offline`` (``iqa/colour.py``)."""
    return [
        # issue 25 (colour.py), weights chosen on the audit's tune photos with the members above fixed:
        # large-scale chroma capped at 6 (most photos lie above: over-saturation earns nothing),
        # fine-scale chroma over fine-scale luma from 1 (natural photos lie below), hue at natural sectors
        _m("chroma_spread", "physical:chroma_spread", 0.3, 0.0, 6.0, True),
        _m("chroma_noise", "physical:chroma_noise", 0.5, 1.0, 2.0, False),
        _m("hue_naturalness", "physical:hue_naturalness", 0.2, -0.8, 0.5, True),
    ]


def _physical_task_members(snow_saturation: float | None, desnow_veil: float = 0.2,
                           lowlight_contrast: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """The task members of ``offline`` / ``offline_v2`` (``snow_saturation``: flakes counted only
    up to this saturation; None: every bright blob; ``desnow_veil`` / ``lowlight_contrast``: the
    weights of desnow's veil and low light's contrast member)."""
    snow = {} if snow_saturation is None else {"saturation": snow_saturation}
    # dark channel below 0.15 (a clean photo's) earns nothing more: no reward for dark texture
    return {
        "dehaze": [
            _m("haze", "physical:haze_density", 0.2, 0.15, 0.6, False),
            _m("contrast", "physical:contrast", 0.1, 0.0, 0.3, True),
        ],
        "derain": [
            _m("rain", "physical:rain_streaks", 0.2, 0.0, 1.0, False),
            _m("veil", "physical:haze_density", 0.2, 0.15, 0.6, False),
            _m("contrast", "physical:contrast", 0.1, 0.0, 0.3, True),
        ],
        "desnow": [
            _m("snow", "physical:snow_flakes", 0.2, 0.0, 0.2, False, **snow),
            _m("veil", "physical:haze_density", desnow_veil, 0.15, 0.6, False),
            _m("contrast", "physical:contrast", 0.1, 0.0, 0.3, True),
        ],
        "lowlight": [
            _m("exposure", "physical:exposure", 0.2, 0.0, 1.0, True),
            _m("contrast", "physical:contrast", lowlight_contrast, 0.0, 0.3, True),
        ],
    }


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "description": "Released QualiTeacher fusion: 0.4 MUSIQ/100 + 0.2 (1 - P_clip(degraded)) + 0.4 (100 - BRISQUE)/100",
        "members": [
            _m("musiq", "pyiqa:musiq", 0.4, 0.0, 100.0, True),
            _m("clip", "clip:degradation", 0.2, 0.0, 1.0, True, model="ViT-B-32", pretrained="openai"),
            _m("brisque", "pyiqa:brisque", 0.4, 0.0, 100.0, False),
        ],
        "task_members": {},
    },
    "offline": {
        "description": "No download, audited on tune / report photos (qualiteacher iqa audit, issues 12 and 25): PIQE + BRISQUE + NIQE (native size) + blockiness (range 0.1-1) + clipping of neutral pixels + colourfulness + colour cast + colour (chroma spread, chroma noise, hue naturalness) + physical",
        # clipping counts a pixel by 1 - its chroma: a vivid colour's empty channel is not exposure
        # clipping, and counting it paid for desaturating vivid photos (issue 25, 2026-12-07, fifth session)
        "members": _audited_members(BLOCKINESS_RANGE, clipping_neutral=1.0) + _colour_members(),
        # desnow's flakes up to saturation 0.4: a brown tint (white -> 0.22) cannot hide them; desnow's
        # veil 0.3 and low light's contrast 0.3 (0.2 / 0.1 before, offline_v5): the blur ladder, which
        # the veil and the contrast order and the clipping member reverses (issue 25, seventh session)
        "task_members": _physical_task_members(snow_saturation=0.4, desnow_veil=0.3, lowlight_contrast=0.3),
    },
    "offline_v5": {
        "description": "Before the blur-ladder weights (issue 25, 2026-12-07, seventh session; kept for comparison): offline with desnow's veil at 0.2 and low light's contrast at 0.1",
        "members": _audited_members(BLOCKINESS_RANGE, clipping_neutral=1.0) + _colour_members(),
        "task_members": _physical_task_members(snow_saturation=0.4),
    },
    "offline_v4": {
        "description": "Before neutral clipping (issue 25, 2026-12-07, fifth session; kept for comparison): offline with clipping counting every pixel with one channel at 0 or 1, vivid colours included",
        "members": _audited_members(BLOCKINESS_RANGE) + _colour_members(),
        "task_members": _physical_task_members(snow_saturation=0.4),
    },
    "offline_v3": {
        "description": "Before the blockiness recalibration (issue 25, 2026-12-07; kept for comparison): offline with blockiness graded on 0.3-2, blind to JPEG q52 and above",
        "members": _audited_members() + _colour_members(),
        "task_members": _physical_task_members(snow_saturation=0.4),
    },
    "offline_v2": {
        "description": "Before the colour audit (issue 25; kept for comparison). No download, audited against destroyed outputs on 5 photos (issue 12): PIQE + BRISQUE + NIQE (native size) + blockiness + clipping + colourfulness + colour cast + physical",
        "members": _audited_members(),
        "task_members": _physical_task_members(snow_saturation=None),
    },
    "offline_v1": {
        "description": "Before the destruction audit (issue 12; kept for comparison). No download: PIQE + BRISQUE (brisque-package LIVE SVR) + NIQE (fitted on skimage photos) + blockiness + physical",
        "members": [
            _m("piqe", "pyiqa:piqe", 0.2, 0.0, 100.0, False, differentiable=False, reward_mode="detach"),
            _m("brisque", "offline:brisque", 0.3, 0.0, 100.0, False),
            _m("niqe", "offline:niqe", 0.3, 0.0, 25.0, False),
            _m("blockiness", "physical:blockiness", 0.2, 0.3, 2.0, False),
        ],
        "task_members": {
            "dehaze": [
                _m("haze", "physical:haze_density", 0.2, 0.0, 0.6, False),
                _m("contrast", "physical:contrast", 0.1, 0.0, 0.3, True),
            ],
            "derain": [
                _m("rain", "physical:rain_streaks", 0.2, 0.0, 1.0, False),
                _m("contrast", "physical:contrast", 0.1, 0.0, 0.3, True),
            ],
            "desnow": [
                _m("snow", "physical:snow_flakes", 0.2, 0.0, 0.2, False),
                _m("contrast", "physical:contrast", 0.1, 0.0, 0.3, True),
            ],
            "lowlight": [
                _m("exposure", "physical:exposure", 0.2, 0.0, 1.0, True),
                _m("contrast", "physical:contrast", 0.1, 0.0, 0.3, True),
            ],
        },
    },
}


def list_iqa_presets() -> list[str]:
    return list(PRESETS)


def preset_specs(preset: str, task: str | None = None) -> list[MemberSpec]:
    """Member specs of a preset, with the task's members appended when the preset has any."""
    if preset not in PRESETS:
        raise KeyError(f"unknown IQA preset {preset!r}; available: {list_iqa_presets()}")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {TASKS}")
    entry = PRESETS[preset]
    entries = list(entry["members"])
    if task is not None:
        entries += entry["task_members"].get(task, [])
    return [MemberSpec.from_dict(copy.deepcopy(e)) for e in entries]


def random_iqa_enabled() -> bool:
    """True only when ``QUALITEACHER_RANDOM_IQA`` is 1 / true / yes (never by default)."""
    return os.environ.get(RANDOM_IQA_ENV, "").strip().lower() in ("1", "true", "yes")


def needs_stand_in(spec: MemberSpec) -> bool:
    """Whether the random-IQA switch replaces this member: CLIP, and pyiqa metrics with weight files."""
    if spec.kind == "clip":
        return True
    if spec.kind != "pyiqa":
        return False

    return bool(METRIC_WEIGHT_FILES.get(spec.metric, True))


def _stand_in_member(spec: MemberSpec, task: str | None) -> nn.Module:
    # no file is read or downloaded: random networks, or the offline preset's shipped parameters
    options = {k: v for k, v in spec.options.items() if k != "min_size"}
    if spec.kind == "clip":
        model, tokenizer = load_open_clip(options.get("model", "ViT-B-32"), None, spec.name)
        prompts, num_good = clip_prompts(spec.metric, options.get("task", task))
        return ClipMember(model, tokenizer, prompts, num_good, float(options.get("logit_scale", 100.0)))
    if spec.metric in ("brisque", "niqe"):
        return build_member(MemberSpec.from_dict({**spec.to_dict(), "backend": f"offline:{spec.metric}",
                                                  "weights_path": None}), task)

    return build_pyiqa_member(spec.metric, spec.name, None, spec.options.get("min_size"), allow_download=False,
                              pretrained=False)


def build_member(spec: MemberSpec, task: str | None = None, weights_dir: str | None = None) -> nn.Module:
    """The scoring module of one spec (loads/converts/fits its weights as needed)."""
    options = {k: v for k, v in spec.options.items() if k != "min_size"}
    min_size = spec.options.get("min_size")
    if spec.kind == "pyiqa":
        path = spec.weights_path
        if path is None and weights_dir is not None:
            file_name = default_weight_file(spec.metric)
            if file_name and (Path(weights_dir) / file_name).is_file():
                path = str(Path(weights_dir) / file_name)
        return build_pyiqa_member(spec.metric, spec.name, path, min_size, **options)
    if spec.kind == "offline":
        if spec.metric == "brisque":
            return offline.load_brisque_svr(spec.weights_path)
        if spec.metric == "niqe" and spec.options.get("native"):
            return offline.native_niqe_member(spec.weights_path)  # blocks follow the image size
        if spec.metric == "niqe":
            path = spec.weights_path or str(offline.default_niqe_params())
            return build_pyiqa_member("niqe", spec.name, path, min_size)
        raise ValueError(f"member {spec.name!r}: unknown offline metric {spec.metric!r} (brisque, niqe)")
    if spec.kind == "physical":
        return PhysicalMember(spec.metric, **options)

    pretrained = spec.weights_path or options.get("pretrained")
    model, tokenizer = load_open_clip(options.get("model", "ViT-B-32"), pretrained, spec.name)
    prompts, num_good = clip_prompts(spec.metric, options.get("task", task))
    return ClipMember(model, tokenizer, prompts, num_good, float(options.get("logit_scale", 100.0)))


def ensemble_from_specs(specs: list[MemberSpec], task: str | None = None, weights_dir: str | None = None,
                        random_weights: bool | None = None) -> Ensemble:
    """Build every member, assemble the ensemble, freeze it (no grad, eval mode).

    ``random_weights`` (default: ``random_iqa_enabled()``) builds stand-ins for the members that
    need downloaded weights (see the module doc): the ensemble is then marked meaningless.
    """
    random_weights = random_iqa_enabled() if random_weights is None else random_weights
    stand_ins = [s.name for s in specs if random_weights and needs_stand_in(s)]
    members = {}
    for i, s in enumerate(specs):
        if s.name in stand_ins:
            with torch.random.fork_rng(devices=[]):  # the same stand-in every time, global RNG untouched
                torch.manual_seed(RANDOM_IQA_SEED + i)
                members[s.name] = _stand_in_member(s, task)
        else:
            members[s.name] = build_member(s, task, weights_dir)
    if stand_ins:
        print(f"[iqa] WARNING: {', '.join(stand_ins)} built with stand-in weights: every score is "
              f"{MEANINGLESS}", file=sys.stderr)
    ensemble = Ensemble(specs, members, task=task, random_members=stand_ins)
    ensemble.requires_grad_(False)
    return ensemble.eval()


def build_ensemble(preset: str, task: str | None = None, weights_dir: str | None = None) -> Ensemble:
    """The frozen ensemble of a preset (``task`` adds the task's members and CLIP prompts)."""
    return ensemble_from_specs(preset_specs(preset, task), task, weights_dir)


def build_ensemble_from_yaml(path: str | Path, task: str | None = None, weights_dir: str | None = None) -> Ensemble:
    return ensemble_from_specs(load_specs_yaml(path, task), task, weights_dir)


def label_meaningless(table: "pd.DataFrame", ensemble: Ensemble) -> "pd.DataFrame":
    """``table`` with an ``iqa_scores`` column saying ``MEANINGLESS`` when ``ensemble`` runs on
    stand-in weights (unchanged otherwise): no score table of a random ensemble goes unlabelled."""
    return table.assign(iqa_scores=MEANINGLESS) if ensemble.meaningless else table


def write_preset_yaml(preset: str, path: str | Path) -> Path:
    """Write ``PRESETS[preset]`` as YAML (how ``configs/iqa/*.yaml`` are produced)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown IQA preset {preset!r}; available: {list_iqa_presets()}")
    path = Path(path)
    header = f"# IQA preset '{preset}' (mirror of qualiteacher/iqa/presets.py PRESETS; edit a copy)\n"
    path.write_text(header + yaml.safe_dump(PRESETS[preset], sort_keys=False, width=110))
    return path
