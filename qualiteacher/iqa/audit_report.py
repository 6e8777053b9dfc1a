"""Writing an ensemble audit (``audit.run_audit``): CSV tables, a Markdown report, one figure,
and the same to MLflow when a run is active."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qualiteacher.iqa.audit import (
    FUSED,
    AuditResult,
    StudentOutputs,
    default_images,
    folder_images,
    overfit_table,
    run_audit,
    verdict,
)
from qualiteacher.iqa.ensemble import load_specs_yaml
from qualiteacher.iqa.presets import ensemble_from_specs, list_iqa_presets, preset_specs
from qualiteacher.say import say
from qualiteacher.tables import markdown_table

RANDOM_WEIGHTS_BANNER = (
    "**RANDOM WEIGHTS: THESE SCORES ARE MEANINGLESS.** The members were built with random "
    "(untrained) weights to exercise the code path only; nothing below says anything about the "
    "real ensemble. Run the audit again with the downloaded weights."
)


def _table(df: pd.DataFrame, index_name: str) -> str:
    df = df.copy()
    df.index.name = index_name
    return markdown_table(df.astype(float), digits=2)


def audit_markdown(result: AuditResult, tune: AuditResult | None = None) -> str:
    """The report: verdict, the overfit check (with ``tune``), pass fractions, ladder rhos, failing
    pairs, member errors, timing. ``result`` is the report set's audit."""
    meta = result.meta
    ok, line = verdict(result)
    out = [f"# IQA ensemble audit: preset `{meta['preset']}`, task `{meta['task']}`", ""]
    if meta["random_weights"]:
        out += [f"> {RANDOM_WEIGHTS_BANNER}", ""]
        if meta.get("random_members"):
            out += [f"> Members on stand-in weights: {', '.join(meta['random_members'])}.", ""]
    out += [f"**{'PASS' if ok else 'FAIL'}**: {line}.", "",
            f"{meta['images']} clean images at {meta['size']} px, {meta['pairs']} destruction pairs, "
            f"seed {meta['seed']}; the audit took {meta['seconds']} s.", ""]
    if tune is not None:
        out += ["## Overfit check: tune photos vs report photos", "",
                f"Weights are chosen on the tune photos ({tune.meta['images']} images); the verdict is "
                f"the report photos' ({meta['images']} images). Fused pass fraction per destruction and "
                "fused ladder rho; a report figure far below its tune figure is overfitting:", "",
                _table(overfit_table(tune, result), "fused"), ""]
    out += ["## Destruction pairs (report photos)" if tune is not None else "## Destruction pairs", "",
            "Fraction of pairs where the destroyed image scores **below** its clean source "
            "(1 = always; members normalised to [0, 1], higher = better):", "",
            _table(result.pass_table, "destruction"), "",
            "## Degradation ladders", "",
            "Mean Spearman rho between strength and score over the images (1 = the score falls "
            "as the degradation grows):", ""]
    out += [_table(result.ladder_summary, "ladder") if len(result.ladder_summary) else "(not run)", ""]
    fails = result.failures
    out += [f"## Failing pairs of the fused score ({len(fails)})", ""]
    if len(fails):
        shown = fails.sort_values("margin", ascending=False).head(40)
        out += ["| destruction | image | source | destroyed | margin |", "|---|---|---|---|---|"]
        out += [f"| {r.destruction} | {r.image} | {r.source:.3f} | {r.destroyed:.3f} | {r.margin:+.3f} |"
                for r in shown.itertuples()]
        if len(fails) > len(shown):
            out.append(f"\n(and {len(fails) - len(shown)} more in the CSV)")
    else:
        out.append("none")
    errors = meta["member_errors"]
    if errors:
        out += ["", "## Images a member could not score (left out of that member's score)", ""]
        out += [f"- `{k}`: {v}" for k, v in sorted(errors.items())]
    return "\n".join(out) + "\n"


def audit_figure(result: AuditResult, path: Path) -> Path:
    """Two heat maps: pass fraction (destruction x scorer) and ladder rho (ladder x scorer)."""
    import matplotlib  # lazy: matplotlib takes 0.5 s to import and only the audit figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see the import above

    panels = [(result.pass_table, "destroyed < source (fraction of pairs)", 0.0, 1.0)]
    if len(result.ladder_summary):
        panels.append((result.ladder_summary, "ladder Spearman rho", -1.0, 1.0))
    widths = [max(4.0, 0.6 * t.shape[1] + 2) for t, *_ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 0.42 * len(result.pass_table) + 2.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (table, title, vmin, vmax) in zip(axes[0], panels):
        values = table.to_numpy(dtype=float)
        im = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        fontweight="bold" if table.columns[j] == FUSED else "normal")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    meta = result.meta
    title = f"IQA audit: {meta['preset']} / {meta['task']} ({meta['images']} images, {meta['size']} px)"
    if meta["random_weights"]:
        title += "\nRANDOM WEIGHTS - MEANINGLESS SCORES"
    fig.suptitle(title, fontsize=10, color="red" if meta["random_weights"] else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_audit(result: AuditResult, out_dir: str | Path, tune: AuditResult | None = None) -> list[Path]:
    """``audit_<preset>_<task>`` + ``.md``, ``.png``, ``_pass.csv``, ``_ladders.csv``, ``_pairs.csv``,
    ``_failures.csv`` (and ``_overfit.csv`` with ``tune``; the pairs of both sets, column ``set``)
    in ``out_dir``; logged to the active MLflow run, if any. ``result`` is the report set's audit."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = result.meta
    stem = f"audit_{Path(str(meta['preset'])).stem}_{meta['task']}"
    paths = [out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(audit_markdown(result, tune))
    audit_figure(result, paths[1])
    pairs = result.pairs.assign(set="report")
    tables = [("pass", result.pass_table, True), ("ladders", result.ladders, False)]
    if tune is not None:
        pairs = pd.concat([tune.pairs.assign(set="tune"), pairs], ignore_index=True)
        tables.append(("overfit", overfit_table(tune, result), True))
    for suffix, df, index in (*tables, ("pairs", pairs, False), ("failures", result.failures, False)):
        path = out / f"{stem}_{suffix}.csv"
        df.to_csv(path, index=index)
        paths.append(path)
    _log_mlflow(result, paths)
    return paths


def _log_mlflow(result: AuditResult, paths: list[Path]) -> None:
    import mlflow  # lazy: mlflow takes 1.5 s to import; only an audit inside a tracked run logs

    if mlflow.active_run() is None:
        return
    task = result.meta["task"]
    metrics = {f"iqa_audit/{task}/pass_{k}": float(v) for k, v in result.pass_table[FUSED].items()}
    if len(result.ladder_summary):
        metrics.update({f"iqa_audit/{task}/rho_{k}": float(v) for k, v in result.ladder_summary[FUSED].items()})
    mlflow.log_metrics(metrics)
    mlflow.log_param(f"iqa_audit/{task}/random_weights", result.meta["random_weights"])
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path="iqa_audit")


def audit_command(preset: str, task: str, images: str | None = None, out: str = "iqa_audit", size: int = 96,
                  seed: int = 0, random_weights: bool = False, weights_dir: str | None = None,
                  strict: bool = False, demo_root: str | None = None,
                  student_outputs: StudentOutputs | None = None,
                  trained_outputs: StudentOutputs | None = None) -> int:
    """``qualiteacher iqa audit``: build the ensemble (a preset name or a YAML file of members),
    audit it on the tune and the report photos (``images``: the user's photos, all reported),
    write the report, print the overfit check and the verdict (report photos). Returns 1 when
    ``strict`` and the verdict fails. ``student_outputs``: the untrained student's outputs
    (``training.students.untrained_student_outputs`` from the CLI); ``trained_outputs``: a
    trained student's (``--checkpoint``, ``training.students.trained_student_outputs``)."""
    if size < 32:
        raise ValueError(f"--size must be >= 32 px, got {size}")
    if Path(preset).suffix in (".yaml", ".yml") or Path(preset).is_file():
        specs = load_specs_yaml(preset, task)
    elif preset in list_iqa_presets():
        specs = preset_specs(preset, task)
    else:
        raise ValueError(f"unknown IQA preset {preset!r}: give one of {list_iqa_presets()} or a YAML file")
    if random_weights:  # stand-ins for the members that need downloaded weights (presets.py)
        ensemble = ensemble_from_specs(specs, task, weights_dir, random_weights=True)
    else:
        ensemble = ensemble_from_specs(specs, task, weights_dir)
    if images:
        sets = {"report": folder_images(images, size)}
    else:
        demo = demo_root if demo_root and Path(demo_root).is_dir() else None
        sets = {split: default_images(size, split, demo_root=demo, task=task) for split in ("tune", "report")}
    results = {name: run_audit(ensemble, task, imgs, preset=preset, seed=seed, random_weights=random_weights,
                                   student_outputs=student_outputs, trained_outputs=trained_outputs)
               for name, imgs in sets.items()}
    result, tune = results["report"], results.get("tune")
    paths = write_audit(result, out, tune)
    ok, line = verdict(result)
    if result.meta["random_weights"]:
        say(f"WARNING: {RANDOM_WEIGHTS_BANNER}".replace("**", ""), "quiet")
    say(result.pass_table.round(2).to_string(), "quiet")
    if len(result.ladder_summary):
        say(result.ladder_summary.round(2).to_string(), "quiet")
    if tune is not None:
        say(f"overfit check: fused, tune photos ({tune.meta['images']} images) vs report photos "
              f"({result.meta['images']} images)")
        say(overfit_table(tune, result).round(3).to_string(), "quiet")
    seconds = sum(r.meta["seconds"] for r in results.values())
    say(f"{'PASS' if ok else 'FAIL'} (report photos): {line}; {len(result.failures)} failing pair(s); "
        f"{seconds:.1f} s", "quiet")
    say(f"report: {paths[0]} (and {len(paths) - 1} more files in {paths[0].parent})")
    return 1 if strict and not ok else 0
