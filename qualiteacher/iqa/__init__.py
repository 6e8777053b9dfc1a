"""No-reference IQA ensemble (METHOD.md §2). pyiqa is used only through ``pyiqa_adapter``."""

from qualiteacher.iqa.ensemble import Ensemble, EnsembleScores, load_specs_yaml
from qualiteacher.iqa.members import MemberSpec, MissingWeightsError, Normalization, fit_quantile_levels
from qualiteacher.iqa.presets import build_ensemble, build_ensemble_from_yaml, list_iqa_presets

__all__ = [
    "Ensemble",
    "EnsembleScores",
    "MemberSpec",
    "MissingWeightsError",
    "Normalization",
    "build_ensemble",
    "build_ensemble_from_yaml",
    "fit_quantile_levels",
    "list_iqa_presets",
    "load_specs_yaml",
]
