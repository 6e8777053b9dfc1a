"""The shared start of a study: per seed, the pipeline's stages before stage 3, trained once.

Every mode of a seed starts stage 3 from the same warm-up (stage 1 and 2 for IQPIR, and whatever
stages the pipeline runs before stage 3, e.g. the fidelity stage; the supervised warm-up for the
U-Net). The stages run through the pipeline itself (same config, resume and MLflow logging), in a
pipeline folder per seed whose MLflow parent run is the study's warm-up run of that seed.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from qualiteacher.say import say


def warm_stages(cfg: dict[str, Any]) -> list[str]:
    """The pipeline's stages before stage 3 for this config's student (``data`` included)."""
    from qualiteacher.pipeline.config import student_stages

    stages = student_stages(cfg["student"])
    return stages[: stages.index("stage3")]


def grade_labeled(cfg: dict[str, Any], table: Path, exclude: tuple[str, ...]) -> Path:
    """Build the demo data when it is missing, then grade the labeled clean images with the
    ensemble minus ``exclude`` (the stage-1 HQ gate must not see a held-out member) into ``table``
    (once per study: every seed reads it)."""
    from qualiteacher.pipeline.config import ConfigError

    root, task = Path(cfg["data_root"]), cfg["task"]
    if not (root / task / "labeled").is_dir():
        demo = cfg.get("demo", {})
        if not demo.get("generate", True):
            raise ConfigError(f"data_root: no labeled data at {root / task / 'labeled'} and demo generation is off")
        from qualiteacher.data.demo import build_demo

        say(f"[study] building the demo data in {root}")
        build_demo(root, progress=bool(cfg.get("progress", True)), overwrite=True,
                   **{k: v for k, v in demo.items() if k != "generate"})
    if cfg["student"] == "iqpir" and not table.is_file():
        from qualiteacher.iqa.cache import grade_clean_images

        scores = grade_clean_images(root / task / "labeled" / "gt", task,
                                    cfg["stage3"]["model"].get("iqa_preset", "offline"),
                                    table.parent / "iqa_cache.parquet", exclude=exclude)
        table.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(table, index=False)
    return table


def warm_up(cfg: dict[str, Any], seed: int, parent_run: Callable[[], str]) -> None:
    """Run, resume or skip the warm-up stages of ``cfg`` (into ``cfg['out_dir']``) at ``seed``.

    ``parent_run()`` gives the MLflow run the stages' runs nest under (asked for once per folder).
    """
    from qualiteacher.pipeline.config import PipelineConfig
    from qualiteacher.pipeline.run import run_pipeline
    from qualiteacher.pipeline.state import PipelineState

    out = Path(cfg["out_dir"])
    state = PipelineState(out / "state.json")
    if "parent_run_id" not in state.data:
        state.data["parent_run_id"] = parent_run()
        state.save()
    for stage in warm_stages(cfg):
        if PipelineState(out / "state.json").done(stage):
            continue
        L.seed_everything(seed, workers=True, verbose=False)
        run_pipeline(PipelineConfig.from_dict(cfg), only_stage=stage)
