"""``qualiteacher app``: arguments and start-up (load the model, build the ensemble, serve the page).

``qualiteacher --help`` loads this module to build its parser: the model, the ensemble and the page
(torch, gradio) are imported inside ``run_app``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qualiteacher.say import say

DEFAULT_MODEL = "models:/qualiteacher-dehaze/latest"


def add_app_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="stage-3 checkpoint (OUT/stage3/final.ckpt)")
    src.add_argument("--model", default=None,
                     help=f"registered model URI (default without --checkpoint: {DEFAULT_MODEL})")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow registry for --model (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--examples", default=None,
                   help="folder of example images (default: demo_data/TASK/test/lq when present)")
    p.add_argument("--task", default=None, help="task of the IQA ensemble (default: the model's)")
    p.add_argument("--iqa-preset", default=None, help="IQA ensemble preset (default: the model's)")
    p.add_argument("--tile", type=int, default=None, help="tile size (0: never; default: 512-px tiles above 512 px)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest upload in pixels (default: 40 million)")
    p.add_argument("--device", default="cpu")


def run_app(args: argparse.Namespace) -> int:
    # lazy: see the module docstring
    from qualiteacher.app.model import ModelLoadError, load_checkpoint_model, load_registry_model

    if args.port is not None and not 0 < args.port < 65536:
        print(f"error: --port {args.port} is not a TCP port", file=sys.stderr)
        return 2
    try:
        if args.checkpoint:
            model = load_checkpoint_model(args.checkpoint)
        else:
            model = load_registry_model(args.model or DEFAULT_MODEL, args.tracking_uri)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = model._replace(task=args.task or model.task, iqa_preset=args.iqa_preset or model.iqa_preset,
                           student=model.student.to(args.device),
                           teacher=None if model.teacher is None else model.teacher.to(args.device))
    from qualiteacher.iqa.presets import build_ensemble  # lazy: see the module docstring

    ensemble = build_ensemble(model.iqa_preset, task=model.task, weights_dir=model.iqa_weights_dir).to(args.device)
    examples_dir = args.examples or (f"demo_data/{model.task}/test/lq" if model.task else None)
    from qualiteacher.app.logic import MAX_PIXELS  # lazy: see the module docstring
    from qualiteacher.app.ui import Settings, build_app, example_images, launch  # lazy: see the module docstring

    examples = example_images(examples_dir)
    page = build_app(model, ensemble, examples, Settings(tile=args.tile, max_pixels=args.max_pixels or MAX_PIXELS))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: anyone who can reach this machine can use the app (no login)",
              file=sys.stderr)
    say(f"[app] {model.source} · task {model.task} · ensemble {model.iqa_preset} · "
        f"{len(examples)} example(s) · open http://{args.host}:{args.port} (Ctrl+C stops)", "quiet")
    launch(page, args.host, args.port, allowed=[str(Path(examples_dir).resolve())] if examples else [])
    return 0
