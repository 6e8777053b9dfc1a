"""``qualiteacher pipeline TASK [options]`` and ``pipelines/<task>.py``: options, overrides, errors."""
from __future__ import annotations

import argparse
import sys

import yaml

from qualiteacher import console
from qualiteacher.errors import USER_ERROR, OneLineParser, run_with_contract
from qualiteacher.pipeline.config import STAGES, TASKS, ConfigError, student_stages
from qualiteacher.pipeline.resolve import list_config_presets, resolve_config
from qualiteacher.pipeline.run import run_pipeline
from qualiteacher.pipeline.sections import plan_run
from qualiteacher.say import say


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="qualiteacher pipeline TASK",
        description="Run a task's staged recipe. Extra options --SECTION.KEY=VALUE override the "
                    "config, e.g. --stage3.model.w_pref=0.5 --stage3.trainer.max_steps=500.",
    )
    p.add_argument("--preset", default="demo", help="config preset: " + ", ".join(list_config_presets()))
    p.add_argument("--config", action="append", default=[], help="extra YAML file(s), merged in order")
    p.add_argument("--from-stage", choices=STAGES, default=None, help="rerun from this stage on")
    p.add_argument("--only-stage", choices=STAGES, default=None, help="run this stage alone")
    p.add_argument("--print_config", "--print-config", action="store_true",
                   help="print the resolved (and validated) configuration and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("--quiet", action="store_const", const="quiet", dest="verbosity", default="normal",
                      help="one line per finished stage and the final summary")
    talk.add_argument("--verbose", action="store_const", const="verbose", dest="verbosity",
                      help="also Lightning's and MLflow's info messages, model summaries, known harmless warnings")
    return p


def run_pipeline_cli(task: str, argv: list[str]) -> int:
    """Entry point of ``qualiteacher pipeline TASK [options]`` and of ``pipelines/<task>.py``."""
    args, rest = build_parser().parse_known_args(argv)
    console.setup(args.verbosity)  # known harmless messages: see qualiteacher/console.py
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    bad = [a for a in rest if a not in overrides]
    if bad:
        print(f"error: unrecognised argument(s) {bad}; overrides look like --stage3.model.lr=1e-4",
              file=sys.stderr)
        return USER_ERROR
    tasks = list(TASKS) if task == "all" else [task]

    def body() -> int:
        try:
            cfgs = [resolve_config(t, args.preset, args.config, overrides) for t in tasks]
            if args.print_config:
                for cfg in cfgs:
                    plan_run(cfg, student_stages(cfg.student), hardware=False)
                    say(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "quiet")
                return 0
            for cfg in cfgs:
                run_pipeline(cfg, args.from_stage, args.only_stage)
        except ConfigError as err:
            if args.debug:
                raise
            print(f"configuration error: {' '.join(str(err).split())}", file=sys.stderr)
            return USER_ERROR
        return 0

    # other expected errors (a missing weight file or checkpoint, a refused checkpoint, an
    # unreachable tracking server): one line, exit code 2 (see qualiteacher.errors)
    return run_with_contract(body, args.debug)
