"""Score cache: IQA scores of image files in a parquet table keyed by content hash and ensemble version.

A file is rescored only when its bytes (sha1) or the ensemble's member specs (``Ensemble.version``)
change; renaming or moving a file reuses its scores. Batching: images are grouped by size
(``resize_side=None``, the default, scores every image at its own size) or, with ``resize_side``,
resized (bilinear, aspect kept) so the shorter side equals ``resize_side`` and then grouped by size.
Unreadable files are reported (``SkipLog``) and skipped.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from qualiteacher.data.io import ImageReadError, get_skip_log, list_images, read_image
from qualiteacher.iqa import presets  # build_ensemble through its module: tests replace it there
from qualiteacher.iqa.bounded import SCORE_SIDE, check_side, read_bounded
from qualiteacher.iqa.ensemble import Ensemble, without_members
from qualiteacher.iqa.guards import MEMBER_ERRORS
from qualiteacher.iqa.offline import qualiteacher_home
from qualiteacher.iqa.presets import MEANINGLESS, label_meaningless

KEY_COLUMNS = ("sha1", "version")


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_cache(cache_path: Path) -> pd.DataFrame:
    if cache_path.is_file():
        return pd.read_parquet(cache_path)
    return pd.DataFrame(columns=[*KEY_COLUMNS])


def _score_batch(ensemble: Ensemble, images: list[np.ndarray], device: torch.device) -> list[dict[str, float]]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(device)
    s = ensemble(x)
    out = []
    for i in range(x.shape[0]):
        row = {"fused": float(s.fused[i]), "level": int(s.level[i])}
        row.update({f"raw_{k}": float(v[i]) for k, v in s.raw.items()})
        row.update({f"norm_{k}": float(v[i]) for k, v in s.normalized.items()})
        out.append(row)
    return out


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = side / min(h, w)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                      align_corners=False, antialias=scale < 1)
    return x[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _score_new(todo: dict[tuple[int, int], list[tuple[Path, str, np.ndarray]]], ensemble: Ensemble,
               batch_size: int, version: str, skip_log: Any, skipped: dict[str, str]) -> dict[Path, dict]:
    """Score the images of ``todo`` (grouped by size) in batches: path -> its cache row. An image the
    ensemble fails on alone is reported (``skip_log``, ``skipped``) and has no row."""
    device = next((b.device for b in ensemble.buffers()), torch.device("cpu"))
    rows: dict[Path, dict] = {}
    for (h, w), items in todo.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            for (path, sha1, _), scores in zip(chunk, _score_isolated(ensemble, chunk, device, skip_log, skipped)):
                if scores is not None:
                    rows[path] = {"sha1": sha1, "version": version, "height": h, "width": w, **scores}
    return rows


def _append_to_cache(cache: pd.DataFrame, rows: list[dict], cache_path: Path) -> None:
    """``cache`` with ``rows`` appended, written atomically (a temporary file, then a rename)."""
    cache = pd.concat([cache, pd.DataFrame(rows)], ignore_index=True) if len(cache) else pd.DataFrame(rows)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp.parquet")
    cache.to_parquet(tmp, index=False)
    tmp.replace(cache_path)


def score_folder(
    folder: str | Path,
    ensemble: Ensemble,
    cache_path: str | Path,
    batch_size: int = 16,
    recursive: bool = True,
    resize_side: int | None = None,
    max_side: int | None = None,
) -> pd.DataFrame:
    """Scores of every image in ``folder`` (one row per readable file), using and updating the cache.

    Columns: path (relative to ``folder``), sha1, version, height, width, fused, level, raw_<member>,
    norm_<member>. ``resize_side`` is part of the cache key (different sizes give other scores).
    ``max_side``: larger images are read in 8 bits and graded downscaled to this longer side
    (``qualiteacher.iqa.bounded``: no full-resolution float copy); part of the cache key too.
    Unreadable files are logged once (``SkipLog``) and listed in ``table.attrs["skipped"]``.
    """
    folder, cache_path = Path(folder), Path(cache_path)
    version = ensemble.version if resize_side is None else f"{ensemble.version}-s{resize_side}"
    version = version if max_side is None else f"{version}-L{max_side}"
    files = list_images(folder, recursive=recursive)
    cache = _load_cache(cache_path)
    known = cache[cache["version"] == version].drop_duplicates("sha1").set_index("sha1") if len(cache) else None
    skip_log = get_skip_log()
    skipped: dict[str, str] = {}

    rows: dict[Path, dict] = {}
    todo: dict[tuple[int, int], list[tuple[Path, str, np.ndarray]]] = defaultdict(list)
    for path in files:
        sha1 = file_sha1(path)
        if known is not None and sha1 in known.index:
            rows[path] = {"sha1": sha1, **known.loc[sha1].to_dict()}
            continue
        try:
            image = read_image(path) if max_side is None else read_bounded(path, max_side)
        except ImageReadError as err:
            skip_log.record(path, err.reason)
            skipped[str(path)] = err.reason
            continue
        if resize_side is not None:
            image = _resize(image, resize_side)
        todo[image.shape[:2]].append((path, sha1, image))

    new_rows = _score_new(todo, ensemble, batch_size, version, skip_log, skipped)
    rows.update(new_rows)
    if new_rows:
        _append_to_cache(cache, list(new_rows.values()), cache_path)
    table = pd.DataFrame([{"path": str(p.relative_to(folder)), **rows[p]} for p in files if p in rows])
    table = table.dropna(axis=1, how="all")
    table.attrs["skipped"] = skipped  # unreadable file -> reason
    # written with a NaN fused score and level -1: no member group holding enough weight could judge them
    table.attrs["unscorable"] = _unscorable(table)
    return table


def _score_isolated(ensemble: Ensemble, chunk: list[tuple[Path, str, np.ndarray]], device: torch.device,
                    skip_log: object, skipped: dict[str, str]) -> list[dict[str, float] | None]:
    # one batched call; if it raises, one call per image so a single image never sinks the others
    try:
        return _score_batch(ensemble, [c[2] for c in chunk], device)
    except MEMBER_ERRORS:
        if len(chunk) == 1:
            return [_score_one(ensemble, chunk[0], device, skip_log, skipped)]
    return [_score_one(ensemble, c, device, skip_log, skipped) for c in chunk]


def _score_one(ensemble: Ensemble, item: tuple[Path, str, np.ndarray], device: torch.device,
               skip_log: object, skipped: dict[str, str]) -> dict[str, float] | None:
    try:
        return _score_batch(ensemble, [item[2]], device)[0]
    except MEMBER_ERRORS as err:
        reason = f"failed to score: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        skip_log.record(item[0], reason)  # type: ignore[attr-defined]
        skipped[str(item[0])] = reason
        return None


def _unscorable(table: pd.DataFrame) -> dict[str, str]:
    if table.empty or "fused" not in table.columns:
        return {}
    raw = [c for c in table.columns if c.startswith("raw_")]
    out = {}
    for _, row in table[table["fused"].isna()].iterrows():
        missing = [c[4:] for c in raw if pd.isna(row[c])] or [c[4:] for c in raw]
        out[str(row["path"])] = f"{row.get('width', '?')}x{row.get('height', '?')}: no score from {', '.join(missing)}"
    return out


def summary_table(table: pd.DataFrame, skipped: int = 0) -> str:
    """Plain-text summary: counts, fused score statistics, level histogram, member means."""
    if table.empty:
        return f"no images scored ({skipped} skipped)"
    unscorable = table.attrs.get("unscorable") or {}
    lines = [f"images scored: {len(table)}   skipped (unreadable): {skipped}",
             f"fused: mean {table.fused.mean():.3f}  std {table.fused.std(ddof=0):.3f}  "
             f"min {table.fused.min():.3f}  max {table.fused.max():.3f}"]
    if unscorable:
        lines.append(f"unscorable (fused NaN, level -1): {len(unscorable)}")
        lines += [f"  {p}: {r}" for p, r in list(unscorable.items())[:10]]
    hist = table.level.astype(int).value_counts().reindex(range(8), fill_value=0)
    lines.append("levels: " + "  ".join(f"{q}:{n}" for q, n in hist.items()))
    lines.append(f"{'member':<14}{'raw mean':>12}{'norm mean':>12}")
    for col in [c for c in table.columns if c.startswith("raw_")]:
        name = col[4:]
        lines.append(f"{name:<14}{table[col].mean():>12.3f}{table['norm_' + name].mean():>12.3f}")
    return "\n".join(lines)


def score_command(
    folder: str | Path,
    preset: str = "offline",
    task: str | None = None,
    out: str | Path | None = None,
    cache: str | Path | None = None,
    batch_size: int = 16,
    resize_side: int | None = None,
    weights_dir: str | None = None,
    max_side: int | None = -1,
) -> tuple[pd.DataFrame, str]:
    """``qualiteacher score DIR``: score a folder with a preset; write ``out`` (.csv or .parquet).

    ``cache`` defaults to ``$QUALITEACHER_HOME/scores.parquet``; ``weights_dir`` holds local IQA
    weight files (as ``build_ensemble``). Images are graded at a longer side of at most
    ``max_side`` (-1: ``bounded.SCORE_SIDE``; None or 0: full size).
    """
    max_side = SCORE_SIDE if max_side == -1 else check_side(max_side)
    ensemble = presets.build_ensemble(preset, task=task, weights_dir=weights_dir)
    cache_path = Path(cache) if cache else qualiteacher_home() / "scores.parquet"
    table = label_meaningless(score_folder(folder, ensemble, cache_path, batch_size=batch_size,
                                           resize_side=resize_side, max_side=max_side), ensemble)
    skipped = len(table.attrs.get("skipped", {}))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False) if out.suffix.lower() == ".csv" else table.to_parquet(out, index=False)
    graded = f"at most {max_side} px a side" if max_side else "full size"
    header = f"preset {preset!r} task {task!r} version {ensemble.version} (graded {graded})\n"
    if ensemble.meaningless:
        header = f"{MEANINGLESS}\n{header}"
    return table, header + summary_table(table, skipped)


def grade_clean_images(folder: str | Path, task: str, preset: str, cache: str | Path,
                       exclude: tuple[str, ...] = (), weights_dir: str | None = None) -> pd.DataFrame:
    """Fused score of every clean image of ``folder`` under the ``preset`` ensemble of ``task``
    without the members ``exclude`` (``id`` = file stem), through the score cache: the stage-1
    quality table. ``weights_dir``: local IQA weight files (as ``build_ensemble``). Scores of an
    ensemble on stand-in weights carry an ``iqa_scores`` column saying they are meaningless."""
    ensemble = presets.build_ensemble(preset, task=task, weights_dir=weights_dir)
    df = score_folder(folder, without_members(ensemble, exclude) if exclude else ensemble, cache)
    if df.empty:  # an empty folder, or every file unreadable (each one reported by the reader)
        raise FileNotFoundError(f"no readable clean images in {folder}: the labeled set's gt/ folder "
                                f"(see data/README.md for the layouts)")
    df = df.assign(id=[Path(p).stem for p in df["path"]])
    return label_meaningless(df[["id", "path", "fused"]], ensemble)
