"""The ``qualiteacher evaluate`` and ``qualiteacher compare`` commands (argument handling only).

``qualiteacher --help`` loads this module to build its parser: everything the commands run (torch,
the harness, MLflow, pandas) is imported inside ``run_evaluate`` / ``run_compare``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from qualiteacher.say import say


def _named(specs: list[str], what: str) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` items; unnamed ones get a name from their path."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
            if len(specs) > 1:  # OUT/stage3/final.ckpt -> the pipeline folder's name
                p = Path(path)
                name = p.parent.parent.name if p.parent.name == "stage3" else p.stem
        if name in out:
            raise ValueError(f"two {what}s named {name!r}: give each NAME=PATH")
        out[name] = path
    return out


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=("dehaze", "derain", "desnow", "lowlight"))
    p.add_argument("--data", required=True, help="benchmark folder (or the demo data root)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]CKPT",
                   help="stage-3 checkpoint (OUT/stage3/final.ckpt); repeat to compare several")
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]FOLDER|classical:METHOD",
                   help="restored images of another method, matched by file name, or a classical restorer "
                        "run here (classical:dcp, classical:lime, ...; classical:TASK: the task's default); "
                        "repeatable")
    p.add_argument("--level", type=int, default=7, help="requested quality level of the students")
    p.add_argument("--w", type=float, default=None,
                   help="fidelity weight in [0, 1] of IQPIR students (default: each checkpoint's own)")
    p.add_argument("--teacher", action="store_true", help="also evaluate each checkpoint's EMA teacher")
    p.add_argument("--metrics", nargs="+", default=["auto"],
                   help="NR-IQA metrics (e.g. musiq clipiqa niqe); auto = whichever have weights")
    p.add_argument("--iqa-preset", default=None, help="ensemble for the fused score (default: the checkpoint's)")
    p.add_argument("--benchmark", default="auto",
                   help="auto (from the folder), demo, paired, unpaired, real3000, rtts, exdark, realsnow")
    p.add_argument("--split", default=None, help="override the benchmark's split")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--detector", default=None, help="torchvision detection model name (needs --detector-weights)")
    p.add_argument("--detector-weights", default=None, help="local weight file of --detector")
    p.add_argument("--detector-target", default=None, help="module:callable or file.py:callable detector")
    p.add_argument("--class-map", default=None,
                   help="COCO -> data-set classes: YAML/JSON file or 'coco=ds,...' (default: the benchmark's)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size (0: never; default: the architecture's, 128 px for the demo model, 512 for the paper one)")
    p.add_argument("--max-memory", default=None,
                   help="memory for an image and the tiles in flight, e.g. 2G or 512M (default: a quarter of the "
                        "available memory, at most 1 GiB, on CPU; half the free memory on a GPU)")
    p.add_argument("--save-images", action="store_true", help="write every restored image to OUT/images/")
    p.add_argument("--out", default=None, help="output folder (default: outputs/eval/TASK-BENCHMARK)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="skip images with more pixels than this, read from the header before decoding "
                        "(default: $QUALITEACHER_MAX_PIXELS or 64 million; 0: no cap)")
    p.add_argument("--mlflow", action="store_true",
                   help="log to MLflow (a new run in experiment 'qualiteacher-eval' unless MLFLOW_RUN_ID is set)")
    p.add_argument("--no-progress", action="store_true")


def run_evaluate(args: argparse.Namespace) -> int:
    from qualiteacher.iqa.members import MissingWeightsError  # lazy: see the module docstring
    from qualiteacher.training.restore import resolve_device  # lazy: see the module docstring

    try:
        args.device = str(resolve_device(args.device))  # checked before any work starts
        if args.mlflow or os.environ.get("MLFLOW_RUN_ID"):
            # lazy: see the module docstring
            from qualiteacher.tracking.mlflow_logger import check_tracking_uri, tracking_uri

            check_tracking_uri(tracking_uri())
        if getattr(args, "max_pixels", None) is not None:
            from qualiteacher.data.io import MAX_PIXELS_ENV  # lazy: see the module docstring

            os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)
        return _evaluate(args)
    except (FileNotFoundError, ValueError, MissingWeightsError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _load_checkpoints(checkpoints: dict[str, str], level: int, tile: int | None) -> dict[str, Any]:
    """The stage-3 checkpoints to evaluate (no bank, finite weights), each checked against the
    requested ``level`` and ``tile`` before any image is read."""
    from qualiteacher.training.restore import check_tile, load_for_inference  # lazy: see the module docstring

    modules = {name: load_for_inference(path) for name, path in checkpoints.items()}
    for name, module in modules.items():
        top = int(module.hparams.get("top_level", 7))
        if not 0 <= level <= top:
            raise ValueError(f"--level {level} is out of range: checkpoint {checkpoints[name]} has levels 0..{top}")
        check_tile(tile, getattr(module.student, "size_multiple", 8))
    return modules


def _evaluate(args: argparse.Namespace) -> int:
    from qualiteacher.data.io import get_skip_log  # lazy: see the module docstring

    # lazy: see the module docstring
    from qualiteacher.eval.harness import (
        CLASSICAL_PREFIX,
        baseline_restorer,
        benchmark_records,
        build_metric_set,
        checkpoint_restorers,
        evaluate,
        write_results,
    )
    from qualiteacher.eval.report import format_table  # lazy: see the module docstring
    from qualiteacher.iqa.presets import build_ensemble  # lazy: see the module docstring

    checkpoints = _named(args.checkpoint, "checkpoint")
    baselines = _named(args.baseline, "baseline")
    if not checkpoints and not baselines:
        raise ValueError("nothing to evaluate: give --checkpoint (and/or --baseline NAME=FOLDER or classical:METHOD)")
    bench, records = benchmark_records(args.task, args.data, args.benchmark, args.split, args.limit)
    detector = class_map = None
    if args.detector or args.detector_target:
        if bench.classes is None:
            raise ValueError(f"benchmark {bench.name!r} has no boxes; detection needs rtts or exdark")
        from qualiteacher.eval.detector import build_detector, load_class_map  # lazy: see the module docstring

        detector = build_detector(args.detector, args.detector_weights, args.detector_target, args.device)
        class_map = load_class_map(args.class_map, bench.name)
    from qualiteacher.training.memory import resolve_budget  # lazy: see the module docstring

    budget = resolve_budget(args.max_memory, args.device)  # a bad value is one line before any work
    modules = _load_checkpoints(checkpoints, args.level, args.tile)
    metrics = build_metric_set(args.metrics)
    for name, reason in metrics.skipped.items():
        say(f"[eval] metric {name} skipped: {reason}")
    restorers = {"input": lambda x, _id: x}
    if args.w is not None and not 0.0 <= args.w <= 1.0:
        raise ValueError(f"--w {args.w} is out of range: the fidelity weight lies in [0, 1]")
    restorers.update(checkpoint_restorers(modules, args.level, args.teacher, args.tile, args.device, w=args.w,
                                          max_memory=budget))
    restorers.update({name or (spec if spec.startswith(CLASSICAL_PREFIX) else name): baseline_restorer(spec)
                      for name, spec in baselines.items()})
    presets = [m.hparams.get("iqa_preset") for m in modules.values()]
    preset = args.iqa_preset or next((p for p in presets if p), "offline")
    # the local IQA weight files the checkpoints were trained with
    weights_dir = next((d for d in (m.hparams.get("iqa_weights_dir") for m in modules.values()) if d), None)
    ensemble = build_ensemble(preset, task=args.task, weights_dir=weights_dir)
    out = Path(args.out or f"outputs/eval/{args.task}-{bench.name}")
    split = args.split or bench.default_split
    say(f"[eval] {bench.name}{f' ({split})' if split else ''}: {len(records)} image(s) from {args.data}; restorers: {', '.join(restorers)}; "
        f"metrics: {', '.join(metrics.modules)} + fused ({preset})")
    result = evaluate(restorers, records, metrics, ensemble, detector, class_map, bench.classes, args.device,
                      out / "images" if args.save_images else None, progress=not args.no_progress)
    files = write_results(result, out, title=f"{args.task} on {bench.name} ({len(records)} images)")
    say(format_table(result.table), "quiet")
    if args.mlflow or os.environ.get("MLFLOW_RUN_ID"):
        _log_mlflow(result, args)
    say(f"[eval] results in {out} ({', '.join(f.name for f in files)})")
    say(f"[data] {get_skip_log().summary()}")
    return 0


def _log_mlflow(result: object, args: argparse.Namespace) -> None:
    import mlflow  # lazy: see the module docstring

    from qualiteacher.eval.harness import log_to_mlflow  # lazy: see the module docstring
    from qualiteacher.tracking.mlflow_logger import tracking_uri  # lazy: see the module docstring

    mlflow.set_tracking_uri(tracking_uri())
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment("qualiteacher-eval")
    with mlflow.start_run(run_name=f"eval-{args.task}") as run:
        mlflow.log_params({"task": args.task, "data": args.data, "level": args.level, "w": args.w,
                           "benchmark": args.benchmark, "checkpoints": ",".join(args.checkpoint)})
        log_to_mlflow(result)
        say(f"[mlflow] logged to run {run.info.run_id} ({mlflow.get_tracking_uri()})")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="[LABEL=]RESULTS_CSV",
                   help="results.csv files of `qualiteacher evaluate` (or their folders)")
    p.add_argument("--out", default=None, help="write the Markdown table here (and a .csv beside it)")


def run_compare(args: argparse.Namespace) -> int:
    import pandas as pd  # lazy: see the module docstring

    from qualiteacher.eval.harness import report_columns  # lazy: see the module docstring
    from qualiteacher.eval.report import comparison_table, markdown_table  # lazy: see the module docstring

    tables = {}
    try:
        for label, path in _named(args.results, "result").items():
            p = Path(path)
            p = p / "results.csv" if p.is_dir() else p
            if not p.is_file():
                raise FileNotFoundError(f"results file not found: {p}")
            tables[label or p.parent.name] = pd.read_csv(p, index_col=0)
        table = comparison_table(tables)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = markdown_table(report_columns(table))
    say(text, "quiet")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        table.to_csv(out.with_suffix(".csv"))
        say(f"written to {out}")
    return 0
