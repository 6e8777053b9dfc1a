"""``qualiteacher study``: argument handling only (the study itself is `study.runner`)."""
from __future__ import annotations

import argparse
import sys

from qualiteacher.say import say
from qualiteacher.study.modes import GROUPS, MODES, resolve_modes


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="dehaze", choices=("dehaze", "derain", "desnow", "lowlight"))
    p.add_argument("--preset", default="demo", help="config preset (demo on CPU, paper on GPU, tiny for tests)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one warm-up and one run per mode per seed")
    p.add_argument("--modes", nargs="+", default=["headline"], metavar="MODE",
                   help=f"training modes: {', '.join(MODES)}; groups: "
                        + ", ".join(f"{g} ({' '.join(m)})" if g != "all" else g for g, m in GROUPS.items()))
    p.add_argument("--steps", type=int, default=None, help="stage-3 steps of every run (default: the preset's)")
    p.add_argument("--out", default=None, help="study folder (default: outputs/study/TASK-PRESET)")
    p.add_argument("--held-out-member", default="piqe", metavar="NAME",
                   help="ensemble member training never sees, reported as an out-of-reward check ('none': keep all)")
    p.add_argument("--data-root", default=None, help="data folder (default: the config's; the demo data is built there)")
    p.add_argument("--config", action="append", default=[], help="extra YAML file(s), merged in order")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="config override as in `qualiteacher pipeline`, e.g. --set student=unet "
                        "--set stage3.model.lr=5e-4 (repeatable)")
    p.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                   help="study folders made with the same settings (seeds run side by side or on other "
                        "machines): their finished runs are copied into --out first, so the table covers "
                        "them and they are not trained again; checkpoints stay where they are")


def run_study_cli(args: argparse.Namespace) -> int:
    # lazy: the study's modules import torch, Lightning and MLflow (seconds); `qualiteacher --help`
    # and the other sub-commands must not wait for them
    from qualiteacher import console
    from qualiteacher.pipeline.api import ConfigError
    from qualiteacher.study.runner import StudySettings, run_study
    from qualiteacher.study.store import StudyMismatch

    held = None if args.held_out_member.lower() == "none" else args.held_out_member
    settings = StudySettings(task=args.task, preset=args.preset, seeds=tuple(dict.fromkeys(args.seeds)),
                             modes=tuple(args.modes), steps=args.steps, out=args.out, held_out=held,
                             data_root=args.data_root, configs=tuple(args.config),
                             overrides=tuple(args.overrides), merge=tuple(args.merge))
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"error: --set takes SECTION.KEY=VALUE, got {bad}", file=sys.stderr)
        return 2
    try:
        resolve_modes(settings.modes)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    console.setup("normal")  # the pipeline's console: Lightning's info lines and known-harmless warnings off
    try:
        result = run_study(settings)
    except (ConfigError, StudyMismatch) as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[study] interrupted: run the same command again to resume (finished runs are kept)",
              file=sys.stderr)
        return 130
    say(f"[study] {len(result.trained)} run(s) done now, {len(result.runs['seed'].unique())} seed(s) in the table")
    return 0
