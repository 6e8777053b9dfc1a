"""``run_study``: every chosen mode trained from one shared warm-up per seed, measured, tabled.

Seeds are the outer loop (a study cut short holds every mode of its first seeds). For each seed:
the warm-up (pipeline stages before stage 3, `study.warmup`), the warm-up's own measures (rows
``input``, ``classical``: the task's classical restorer, and ``warmup``), then stage 3 of every
mode for the same steps on the same data (through the pipeline's stage training: checkpoints,
resume, MLflow), measured on the held-out test split (`study.measures`). Each run's rows are
written atomically when it ends (`study.store`); a rerun skips finished runs. MLflow: one study
run; under it a run per seed's warm-up (holding the pipeline's stage runs) and a run per mode and
seed.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from mlflow.entities import Metric

from qualiteacher.classical import classical_restorer
from qualiteacher.devices import best_device_type
from qualiteacher.iqa.presets import build_ensemble, preset_specs
from qualiteacher.pipeline.api import (
    ConfigError,
    FolderLock,
    PipelineConfig,
    PipelineState,
    RunPlan,
    StagePlan,
    git_commit,
    plan_run,
    read_test_set,
    resolve_config,
    run_training_stage,
)
from qualiteacher.say import say
from qualiteacher.study.modes import GROUPS, is_conditioned, mode_data_overrides, mode_overrides, resolve_modes
from qualiteacher.study.measures import dial_columns, level_dial, measure_restorers
from qualiteacher.study.report import plot_study, row_order, summarize, summary_markdown
from qualiteacher.study.store import RunKey, StudyStore
from qualiteacher.study.warmup import grade_labeled, warm_stages, warm_up
from qualiteacher.tracking.runs import PipelineRuns
from qualiteacher.training.restore import restore
from qualiteacher.training.stage3 import QualiTeacherModule, load_trained

OUT_FILES = {"runs": "study_runs.csv", "summary": "study_summary.csv", "table": "study_summary.md",
             "figure": "study.png"}


@dataclass(frozen=True)
class StudySettings:
    """What ``qualiteacher study`` was asked for (``overrides``: ``section.key=value`` strings;
    ``variants``: extra named modes, stage-3 overrides on top of ``qualiteacher``; ``merge``:
    folders of the same study whose finished runs are copied in, see ``StudyStore.plan_merge``)."""

    task: str = "dehaze"
    preset: str = "demo"
    seeds: tuple[int, ...] = (0, 1, 2)
    modes: tuple[str, ...] = GROUPS["headline"]
    steps: int | None = None
    out: str | None = None
    held_out: str | None = "piqe"
    data_root: str | None = None
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    merge: tuple[str, ...] = ()  # study folders whose finished runs are copied in first

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"outputs/study/{self.task}-{self.preset}")


class StudyResult(NamedTuple):
    runs: pd.DataFrame      # one row per (mode, seed) and the warm-up's input / warmup rows
    summary: pd.DataFrame   # mean / std over seeds per mode
    files: dict[str, Path]  # runs, summary, table, figure
    trained: list[str]      # runs trained (or measured) by this call, finished ones skipped


# ------------------------------------------------------------------------------ configuration
def seed_config(s: StudySettings, store: StudyStore, seed: int) -> PipelineConfig:
    """The pipeline config of ``seed``'s warm-up folder (placeholders filled with it), data seeded."""
    overrides = list(s.overrides) + [f"out_dir={store.warmup_dir(seed)}",
                                     f"stage1.data.quality_table={store.out / 'labeled_quality.csv'}"]
    if s.data_root:
        overrides.append(f"data_root={s.data_root}")
    cfg = resolve_config(s.task, s.preset, list(s.configs), overrides)
    seeded: dict[str, Any] = {stage: {"data": {"seed": seed}} for stage in [*warm_stages(cfg), "stage3"]
                              if stage != "data"}
    seeded["stage3"]["model"] = {"seed": seed}
    return cfg.merged(seeded)


def run_config(seed_cfg: PipelineConfig, store: StudyStore, key: RunKey, steps: int, held_out: str | None,
               variants: Mapping[str, Mapping[str, Any]] | None = None,
               init_from: str | None = None) -> PipelineConfig:
    """``seed_cfg`` with stage 3 set to ``key.mode``: its own folder, the warm-up as init
    (``init_from``: the seed's stage-3 start, when the caller has it parsed already)."""
    if init_from is None:
        init_from = plan_run(seed_cfg, ["stage3"], hardware=False).stage("stage3").args.model.init_from
    model = seed_cfg.stage3.get("model", {})
    model_changes = {"init_from": init_from,
                     "bank_dir": run_bank_dir(model.get("bank_dir"), seed_cfg.out, store.run_dir(key), key),
                     **mode_overrides(key.mode, variants), "iqa_exclude": [held_out] if held_out else []}
    data_changes: dict[str, Any] = {}
    if model_changes.get("mode", model.get("mode")) == "supervised":
        data_changes["unlabeled_root"] = None  # the baseline never reads unlabeled data
    # data not built yet (the study builds the demo data first, oracle pairs included): checked later
    built = (seed_cfg.task_data / "labeled").is_dir()
    data_changes.update(mode_data_overrides(key.mode, seed_cfg.data_root, seed_cfg.task, check=built))
    return seed_cfg.merged({"out_dir": str(store.run_dir(key)),
                            "stage3": {"model": model_changes, "data": data_changes,
                                       "trainer": {"max_steps": steps}}})


def run_bank_dir(bank_dir: str | None, warmup: Path, run: Path, key: RunKey) -> str | None:
    """Every run its own pseudo-label bank folder: the seed config's ``bank_dir`` was filled from the
    warm-up folder, which all modes of a seed share (``{out_dir}/stage3/bank`` moves into the run's
    folder; a folder of the user's gets a sub-folder per run)."""
    if not bank_dir:
        return bank_dir
    bank = Path(bank_dir)
    if bank.is_relative_to(warmup):
        return str(run / bank.relative_to(warmup))
    return str(bank / key.name)


def check_held_out(plan: StagePlan, task: str, held_out: str | None) -> str | None:
    """``held_out`` if it is a member of the stage-3 ensemble (names looked up now, not hard-coded)."""
    if held_out is None:
        return None
    preset = plan.args.model.iqa_preset
    try:
        names = [spec.name for spec in preset_specs(preset, task)]
    except KeyError as err:
        raise ConfigError(str(err)) from err
    if held_out not in names:
        raise ConfigError(f"held-out member {held_out!r} is not in the '{preset}' ensemble of "
                          f"{task} (members: {', '.join(names)}); pass --held-out-member NAME or none")
    if len(names) < 2:
        raise ConfigError(f"the '{preset}' ensemble has one member: nothing is left to train with")
    return held_out


# ------------------------------------------------------------------------------ measuring
class _Measurer:
    """The full ensemble, the test split and the device, built on first use."""

    def __init__(self, cfg: PipelineConfig, stage3: StagePlan, held_out: str | None) -> None:
        self.cfg, self.stage3, self.held_out = cfg, stage3.args, held_out
        self.device = torch.device(best_device_type())
        self.tile = cfg.eval.tile or int(self.stage3.data.crop_size)
        self._ensemble = self._test = None

    def _load(self) -> None:
        if self._ensemble is None:
            m, cfg = self.stage3.model, self.cfg
            self._ensemble = build_ensemble(m.iqa_preset, task=cfg.task, weights_dir=m.iqa_weights_dir).to(self.device)
            self._test = read_test_set(cfg.task_data / cfg.eval.split, cfg.eval.layout, cfg.eval.max_images)

    def rows(self, restorers: dict[str, Any], dial_of: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
        self._load()
        table = measure_restorers(restorers, self._test, self._ensemble, self.held_out, self.device)
        rows = []
        for name, row in table.iterrows():
            dial = None
            if name in dial_of:
                dial = level_dial(dial_of[name], self._test, self._ensemble, self.held_out, self.tile,
                                  device=self.device)
            rows.append({"restorer": name, **row.to_dict(), **dial_columns(dial)})
        return rows

    def restorer(self, net: torch.nn.Module, level: int | None) -> Any:
        net = net.to(self.device).eval()
        return lambda x: restore(net, x, level=level, tile=self.tile)


def warmup_student(stage3: StagePlan) -> torch.nn.Module:
    """The student stage 3 starts from (``stage3.model.init_from`` loaded as stage 3 loads it)."""
    args = {**stage3.args.model.as_dict(), "mode": "supervised", "ensemble": None}  # supervised: no ensemble built
    module = QualiTeacherModule(**args)
    module.setup("fit")
    return module.student


# ------------------------------------------------------------------------------ the study
class _SeedPlan(NamedTuple):
    cfg: PipelineConfig                 # the seed's warm-up pipeline
    stage3: StagePlan                   # its stage 3 parsed: the warm-up student, the ensemble
    runs: dict[str, RunPlan]            # mode -> the mode's stage 3, parsed and checked


def plan_study(s: StudySettings, store: StudyStore) -> tuple[dict[int, _SeedPlan], list[str], int, str | None]:
    """Every seed's config and every mode's stage 3 resolved, parsed and checked once, before
    anything trains: ``(seeds, modes, steps, held_out)``."""
    modes = resolve_modes(s.modes, s.variants)
    cfgs = {seed: seed_config(s, store, seed) for seed in s.seeds}
    if not cfgs:
        raise ConfigError("no seed given")
    base = next(iter(cfgs.values()))
    steps = int(s.steps or base.stage3.get("trainer", {}).get("max_steps") or 0)
    if steps < 1:
        raise ConfigError(f"stage-3 steps must be >= 1, got {steps}")
    seeds = {}
    held: str | None = None
    for seed, cfg in cfgs.items():
        stage3 = plan_run(cfg, ["stage3"], hardware=False).stage("stage3")
        held = check_held_out(stage3, cfg.task, s.held_out)
        init = stage3.args.model.init_from
        seeds[seed] = _SeedPlan(cfg, stage3, {mode: plan_run(run_config(cfg, store, RunKey(mode, seed), steps, held,
                                                                        s.variants, init), ["stage3"])
                                              for mode in modes})
    return seeds, modes, steps, held


def run_study(s: StudySettings) -> StudyResult:
    """Run (or resume) the study ``s``; see the module docstring. Config errors raise ConfigError,
    a folder of another study StudyMismatch, an unknown mode KeyError, before anything trains;
    the study folder is locked while it runs (``pipeline.lock``: a second study there fails at once)."""
    store = StudyStore(s.out_dir)
    seeds, modes, steps, held = plan_study(s, store)
    with FolderLock(store.out, " ".join(["qualiteacher", *sys.argv[1:]])):  # one study per folder from here on
        return _run_checked(s, store, seeds, modes, steps, held)


def _run_checked(s: StudySettings, store: StudyStore, seeds: dict[int, _SeedPlan], modes: list[str],
                 steps: int, held: str | None) -> StudyResult:
    base = next(iter(seeds.values()))
    settings = {"task": s.task, "preset": s.preset, "student": base.cfg.student, "steps": steps,
                "held_out": held, "data_root": base.cfg.data_root, "configs": list(s.configs),
                "overrides": list(s.overrides), "variants": dict(s.variants)}
    incoming = store.plan_merge(s.merge, settings)  # seeds trained in other folders (checked, not yet copied)
    store.check_settings(settings)
    store.copy_in(incoming)  # their finished runs count as finished here
    runs = _study_runs(base.cfg, store, git_commit())
    measurer = _Measurer(base.cfg, base.stage3, held)
    meta = {"task": s.task, "preset": s.preset, "student": base.cfg.student, "steps": steps, "held_out": held}
    trained: list[str] = []
    keys: list[RunKey] = []
    grade_labeled(base.cfg, base.stage3, store.out / "labeled_quality.csv", (held,) if held else ())
    for seed, plan in seeds.items():
        seed_keys = [RunKey("warmup", seed)] + [RunKey(m, seed) for m in modes]
        keys += seed_keys
        if all(store.read(k) is not None for k in seed_keys):
            say(f"[study] seed {seed}: every run finished earlier, skipped")
            continue
        warm_up(plan.cfg, lambda seed=seed: runs.child(RunKey("warmup", seed).name))
        for key in seed_keys:
            if store.read(key) is not None:
                say(f"[study] {key.name}: finished earlier, skipped")
                continue
            say(f"[study] {s.task} · {key.name}" + ("" if key.mode == "warmup" else f" · {steps} stage-3 steps"))
            rows = _run_one(key, plan, runs, measurer)
            rows = [{**meta, "mode": key.mode, "seed": seed, **r} for r in rows]
            store.write(key, rows)
            _log_rows(runs, key, rows, store.result_path(key))
            trained.append(key.name)
    return _finish(store, keys, modes, held, runs, s, trained)


def _run_one(key: RunKey, plan: _SeedPlan, runs: Any, measurer: _Measurer) -> list[dict[str, Any]]:
    if key.mode == "warmup":  # the shared start: the unrestored input, the classical restorer, the warm-up student
        start = time.perf_counter()
        student = warmup_student(plan.stage3)
        rows = measurer.rows({"input": lambda x: x, "classical": classical_restorer(plan.cfg.task),
                              "warmup": measurer.restorer(student, None)}, {})
        return [{**r, "train_s": float("nan"), "eval_s": time.perf_counter() - start} for r in rows]
    run_id = runs.child(key.name)
    runs.client.set_tag(run_id, "mode", key.mode)
    runs.client.set_tag(run_id, "seed", str(key.seed))
    start = time.perf_counter()
    final = run_training_stage(plan.runs[key.mode], "stage3", runs, run_id)
    train_s = time.perf_counter() - start
    module = load_trained(final)
    hp = module.hparams
    level = int(hp.top_level) if hp.get("mode", "qualiteacher") == "qualiteacher" else None
    dial = {key.mode: module.student} if is_conditioned(hp) else {}
    start = time.perf_counter()
    # the mode's EMA teacher too: the student at the top level must beat it (issue 11)
    rows = measurer.rows({key.mode: measurer.restorer(module.student, level),
                          f"{key.mode}/teacher": measurer.restorer(module.teacher, None)}, dial)
    return [{**r, "level": level if level is not None else float("nan"), "train_s": train_s,
             "eval_s": time.perf_counter() - start} for r in rows]


# ------------------------------------------------------------------------------ MLflow and files
def _study_runs(cfg: PipelineConfig, store: StudyStore, commit: str) -> PipelineRuns:
    state = PipelineState(store.out / "mlflow_state.json")
    runs = PipelineRuns(cfg.to_dict(), state, workdir=Path.cwd(), commit=commit)
    if "parent_run_id" not in state.data:
        run = runs.client.create_run(runs.experiment_id, run_name=f"study-{cfg.task}-{cfg.preset}",
                                     tags={**runs.tags, "study": "modes"})
        state.data["parent_run_id"] = run.info.run_id
        state.save()
    runs.start_parent()
    return runs


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "seed":
            out[k] = float(v)
    return out


def _log_rows(runs: Any, key: RunKey, rows: list[dict[str, Any]], path: Path) -> None:
    run_id = runs.child(key.name)
    now = int(time.time() * 1000)
    metrics = [Metric(f"study/{r['restorer']}/{k}", v, now, 0) for r in rows for k, v in _numeric(r).items()]
    for i in range(0, len(metrics), 900):
        runs.client.log_batch(run_id, metrics=metrics[i:i + 900])
    runs.client.log_artifact(run_id, str(path))
    runs.finish(run_id)


def _finish(store: StudyStore, keys: list[RunKey], modes: list[str], held: str | None, runs: Any,
            s: StudySettings, trained: list[str]) -> StudyResult:
    df = store.rows(keys)
    files = {k: store.out / v for k, v in OUT_FILES.items()}
    df.to_csv(files["runs"], index=False)
    order = row_order(df, modes)
    summary = summarize(df, order, held)
    summary.to_csv(files["summary"])
    title = (f"{s.task} · preset {s.preset} · {df['steps'].iloc[0]} stage-3 steps · seeds "
             f"{', '.join(str(x) for x in sorted(df['seed'].unique()))} · held-out member: {held or 'none'}")
    files["table"].write_text(f"# Study: {title}\n\n{summary_markdown(summary, held)}\n")
    plot_study(df, files["figure"], order, held, title=title)
    now = int(time.time() * 1000)
    metrics = [Metric(f"study/{mode}/{col}", float(v), now, 0) for mode, row in summary.iterrows()
               for col, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    for i in range(0, len(metrics), 900):
        runs.client.log_batch(runs.parent_id, metrics=metrics[i:i + 900])
    for path in files.values():
        runs.client.log_artifact(runs.parent_id, str(path), artifact_path="study")
    runs.end_parent()
    runs.close()  # tracking writes the store refused: sent now, or one line saying where they wait
    say(f"\n{files['table'].read_text()}", "quiet")
    say(f"[study] files: {', '.join(str(p) for p in files.values())}")
    say(f"[study] MLflow: {runs.uri} (study run {runs.parent_id})")
    return StudyResult(df, summary, files, trained)
