"""A study's outputs: the per-run CSV, the table (mean ± std over seeds per mode) and the figure."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# columns of the table, in order (members' norm_<m> columns are appended), and their headers
HEADLINE_COLUMNS = ("psnr", "ssim", "colour_corr", "delta_e", "oracle_gap", "clean_psnr", "clean_ssim", "heldout",
                    "fused", "fused_all", "rho", "rho_heldout", "dial_px", "train_s")
LABELS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "colour_corr": "colour corr ↑", "delta_e": "ΔE76 ↓",
          "heldout": "held-out {held} ↑", "fused": "fused (training) ↑",
          "fused_all": "fused (all) ↑", "rho": "level ρ ↑", "rho_heldout": "level ρ ({held}) ↑",
          "dial_px": "dial span (8-bit)", "train_s": "train s", "oracle_gap": "oracle gap closed (PSNR) ↑",
          "clean_psnr": "clean in: PSNR ↑", "clean_ssim": "clean in: SSIM ↑"}
LOWER_BETTER = ("delta_e",)
UNRANKED = ("train_s", "dial_px")  # not scores: never bold
REFERENCES = ("input", "warmup")   # the shared start: shown, never bold (the classical row competes)
PLOTTED = ("psnr", "ssim", "colour_corr", "heldout", "fused")


def row_order(runs: pd.DataFrame, modes: Sequence[str]) -> list[str]:
    """``input``, ``classical`` (the task's classical restorer) and ``warmup`` first (the shared
    start), then the modes in the study's order, each followed by its EMA teacher (``MODE/teacher``)."""
    present = list(dict.fromkeys(runs["restorer"]))
    wanted = ["input", "classical", "warmup", *[r for m in modes for r in (m, f"{m}/teacher")]]
    return [r for r in wanted if r in present]


def table_columns(runs: pd.DataFrame, held_out: str | None = None) -> list[str]:
    """Headline columns, then every member's normalised score (the held-out one is ``heldout``)."""
    members = sorted(c for c in runs.columns if c.startswith("norm_") and c != f"norm_{held_out}")
    return [c for c in (*HEADLINE_COLUMNS, *members) if c in runs.columns and runs[c].notna().any()]


def with_oracle_gap(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``oracle_gap``: per seed, the share of the warm-up -> oracle PSNR gap each row
    closes, ``(psnr - warmup) / (oracle - warmup)`` (1 = as good as training on the target domain's
    own ground truth; NaN where a seed has no oracle or warm-up row)."""
    runs = runs.copy()
    runs["oracle_gap"] = np.nan
    if "psnr" not in runs.columns:
        return runs
    for seed, rows in runs.groupby("seed"):
        ref = rows.set_index("restorer")["psnr"]
        if "warmup" in ref.index and "oracle" in ref.index and ref["oracle"] != ref["warmup"]:
            gap = (rows["psnr"] - ref["warmup"]) / (ref["oracle"] - ref["warmup"])
            runs.loc[rows.index, "oracle_gap"] = gap
    return runs


def summarize(runs: pd.DataFrame, order: Sequence[str], held_out: str | None = None) -> pd.DataFrame:
    """Per restorer (row): ``seeds`` and ``<col>_mean`` / ``<col>_std`` (std over seeds, ddof 1)."""
    runs = with_oracle_gap(runs)
    cols = table_columns(runs, held_out)
    grouped = runs.groupby("restorer", sort=False)[cols]
    out = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1)}, axis=1)
    out.columns = [f"{c}_{stat}" for stat, c in out.columns]
    out = out[[f"{c}_{s}" for c in cols for s in ("mean", "std")]]
    out.insert(0, "seeds", runs.groupby("restorer", sort=False)["seed"].nunique())
    out.index.name = "mode"
    return out.loc[[r for r in order if r in out.index]]


def _cell(mean: float, std: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def summary_markdown(summary: pd.DataFrame, held_out: str | None, digits: int = 3) -> str:
    """A Markdown table: one row per mode, ``mean ± std`` cells, the best mean of each score in bold
    (among the trained modes and the classical restorer; ``input`` and ``warmup`` are references)."""
    cols = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    held = held_out or "–"
    header = ["mode", "seeds"] + [LABELS.get(c, c.removeprefix("norm_") + " ↑").format(held=held) for c in cols]
    trained = [r for r in summary.index if r not in REFERENCES]
    best = {c: (summary.loc[trained, f"{c}_mean"].min() if c in LOWER_BETTER else summary.loc[trained, f"{c}_mean"].max())
            for c in cols if c not in UNRANKED and trained}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in summary.iterrows():
        cells = [str(name), str(int(row["seeds"]))]
        for c in cols:
            d = 0 if c == "train_s" else (2 if c in ("psnr", "clean_psnr") else digits)
            text = _cell(row[f"{c}_mean"], row[f"{c}_std"], d)
            bold = name in trained and c in best and row[f"{c}_mean"] == best[c] and len(trained) > 1
            cells.append(f"**{text}**" if bold else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study(runs: pd.DataFrame, path: str | Path, order: Sequence[str], held_out: str | None,
               title: str = "") -> Path:
    """Bars (mean ± std over seeds) and dots (each seed) of PSNR, SSIM, colour correlation, the
    held-out member and the training fusion, one panel each, one bar per mode."""
    # lazy: matplotlib takes a second to import and only the figure needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [c for c in PLOTTED if c in runs.columns and runs[c].notna().any()]
    fig = Figure(figsize=(3.2 * len(panels), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    x = np.arange(len(order))
    for k, col in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        by = runs.groupby("restorer")[col]
        means = [by.mean().get(r, np.nan) for r in order]
        stds = [by.std(ddof=1).get(r, np.nan) for r in order]
        colors = ["0.75" if r in REFERENCES else f"C{i}" for i, r in enumerate(order)]
        ax.bar(x, means, yerr=np.nan_to_num(stds), color=colors, capsize=3, alpha=0.8)
        for i, r in enumerate(order):
            vals = runs.loc[runs["restorer"] == r, col].to_numpy(dtype=float)
            ax.plot(np.full(len(vals), x[i]), vals, "k.", ms=4)
        finite = [m for m in means if np.isfinite(m)]
        if finite and col != "psnr":
            lo, hi = min(finite), max(finite)
            pad = max(0.02, 0.5 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
        elif finite:
            ax.set_ylim(min(finite) - 2, max(finite) + 1.5)
        ax.set_xticks(x, order, rotation=40, ha="right", fontsize=7)
        ax.set_title(LABELS.get(col, col).format(held=held_out or "–"), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
