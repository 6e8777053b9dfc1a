"""The ``qualiteacher`` console command.

Sub-commands are an explicit table (no registry scanning). Each handler imports what it needs
(torch and everything above it) inside itself, so ``qualiteacher --help`` stays instant: at
start-up only the plain-argparse modules of ``evaluate``, ``study`` and ``app`` load.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qualiteacher.app.command import add_app_arguments, run_app
from qualiteacher.errors import OneLineParser, run_with_contract
from qualiteacher.eval.command import add_compare_arguments, add_evaluate_arguments, run_compare, run_evaluate
from qualiteacher.say import say
from qualiteacher.study.command import add_study_arguments, run_study_cli
from qualiteacher.tasks import TASKS

_MAX_PIXELS_HELP = ("skip images with more pixels than this, read from the file header before decoding "
                    "(default: $QUALITEACHER_MAX_PIXELS or 64 million; 0: no cap)")
_MAX_MEMORY_HELP = ("memory for the images and the tiles in flight, e.g. 2G or 512M (default: a quarter of "
                    "the available memory, at most 1 GiB, on CPU; half the free memory on a GPU)")


# the demo's splits with an image count (``build_demo``'s ``n_*`` keywords; their defaults live there)
_DEMO_SPLITS: tuple[str, ...] = ("labeled", "unlabeled", "test", "val", "unseen", "clean")


def _data_demo(args: argparse.Namespace) -> int:
    from qualiteacher.data.demo import build_demo, summarize_manifest  # lazy: see the module docstring

    counts = {f"n_{split}": n for split in _DEMO_SPLITS if (n := getattr(args, f"n_{split}")) is not None}
    df = build_demo(Path(args.out), seed=args.seed, tasks=tuple(args.tasks), size=args.size,
                    overwrite=args.overwrite, **counts)
    say(summarize_manifest(df), "quiet")
    say(f"demo data written to {args.out}")
    return 0


def _set_max_pixels(args: argparse.Namespace) -> None:
    # the pixel cap of every image read (checked from the header, before decoding); the
    # environment carries it to DataLoader workers and subprocesses
    if getattr(args, "max_pixels", None) is not None:
        from qualiteacher.data.io import MAX_PIXELS_ENV  # lazy: see the module docstring

        if args.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no cap), got {args.max_pixels}")
        os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)


def _data_check(args: argparse.Namespace) -> int:
    from qualiteacher.data.io import ImageReadError, get_skip_log, read_image  # lazy: see the module docstring
    from qualiteacher.data.layouts import read_layout  # lazy: see the module docstring

    _set_max_pixels(args)
    records = read_layout(args.layout, Path(args.root))
    log = get_skip_log()
    n_ok = 0
    for rec in records:
        for path in (rec.lq, rec.gt):
            if path is None:
                continue
            try:
                read_image(path)
                n_ok += 1
            except ImageReadError as err:
                log.record(err.path, err.reason)
    say(f"{len(records)} records, {n_ok} images read")
    say(log.summary(), "quiet")
    return 0


def _iqa_fit_niqe(args: argparse.Namespace) -> int:
    from qualiteacher.iqa.offline import fit_niqe  # lazy: see the module docstring

    out = fit_niqe(Path(args.folder), Path(args.out), block_size=args.block_size)
    say(f"NIQE pristine model written to {out}")
    return 0


def _iqa_audit(args: argparse.Namespace) -> int:
    from qualiteacher.iqa.audit_report import audit_command  # lazy: see the module docstring
    from qualiteacher.training.students import trained_student_outputs, untrained_student_outputs  # lazy: see above

    try:
        trained = trained_student_outputs(args.checkpoint) if args.checkpoint else None
        return audit_command(args.preset, args.task, args.images, args.out, args.size, args.seed,
                             args.random_weights, args.weights_dir, args.strict, args.demo_data,
                             student_outputs=untrained_student_outputs, trained_outputs=trained)
    except (OSError, ValueError) as err:  # bad preset, folder or size: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2


def _iqa_list(args: argparse.Namespace) -> int:
    from qualiteacher.iqa.presets import list_iqa_presets  # lazy: see the module docstring

    for name in list_iqa_presets():
        say(name, "quiet")
    return 0


def _score(args: argparse.Namespace) -> int:
    from qualiteacher.iqa.cache import score_command  # lazy: see the module docstring

    _set_max_pixels(args)
    _, summary = score_command(Path(args.folder), preset=args.preset, task=args.task,
                               out=Path(args.out) if args.out else None,
                               cache=Path(args.cache) if args.cache else None, weights_dir=args.weights_dir,
                               max_side=-1 if args.max_side is None else args.max_side)
    say(summary, "quiet")
    from qualiteacher.data.io import get_skip_log  # lazy: see the module docstring

    say(get_skip_log().summary(), "quiet")
    return 0


def _restore(args: argparse.Namespace) -> int:
    # lazy: see the module docstring
    import torch

    from qualiteacher.data.io import ImageReadError, get_skip_log, write_image
    from qualiteacher.data.layouts import read_unpaired
    from qualiteacher.iqa.bounded import image_size, read_uint8
    from qualiteacher.training.memory import describe, resolve_budget
    from qualiteacher.training.restore import (NonFiniteOutputError, auto_tile, check_output_folder, check_photo_fits,
                                               check_tile, load_for_inference, resolve_device, restore)

    # every value is checked before any image is read or written
    _set_max_pixels(args)
    device = resolve_device(args.device)
    if not Path(args.input).is_dir():
        raise FileNotFoundError(f"input folder not found: {args.input}")
    check_output_folder(args.input, args.out)
    budget = resolve_budget(args.max_memory, device)
    trained = load_for_inference(args.checkpoint)  # no bank: a checkpoint's bank_dir gets no file
    top = int(trained.hparams.get("top_level", 7))
    if not args.teacher and not 0 <= args.level <= top:
        raise ValueError(f"--level {args.level} is out of range: this model has quality levels 0..{top}")
    if args.w is not None and not 0.0 <= args.w <= 1.0:
        raise ValueError(f"--w {args.w} is out of range: the fidelity weight lies in [0, 1]")
    net = (trained.teacher if args.teacher else trained.student).to(device).eval()
    check_tile(args.tile, getattr(net, "size_multiple", 8))
    records = read_unpaired(args.input)
    out = Path(args.out)
    log = get_skip_log()
    done, tiles = 0, set()
    level = None if args.teacher else args.level
    for rec in records:
        try:
            check_photo_fits(*image_size(rec.lq), budget)  # from the header, before decoding
            x = torch.from_numpy(read_uint8(rec.lq)).permute(2, 0, 1)[None]  # uint8 until a tile is cut
            y = restore(net, x, level=level, tile=args.tile, w=args.w, max_memory=budget)
            tiles.add(auto_tile(x, args.tile, net))
        except ImageReadError as err:
            log.record(err.path, err.reason)
            continue
        except NonFiniteOutputError:  # broken weights: every image would come out black
            raise
        except (RuntimeError, ValueError, MemoryError) as err:  # one image never ends the run
            log.record(rec.lq, f"failed to restore: {type(err).__name__}: {str(err)[:200]}")
            continue
        write_image(out / f"{rec.id}.png", y)
        done += 1
    how = ", ".join("whole" if t is None else f"{t}-px tiles" for t in sorted(tiles, key=lambda t: t or 0)) or "-"
    say(f"{done} image(s) restored into {out} ({'teacher' if args.teacher else f'student at level {args.level}'}; "
        f"{how}; memory budget {describe(budget)})")
    say(log.summary(), "quiet")
    return 0


def _detmap(args: argparse.Namespace) -> int:
    from qualiteacher.data.layouts import read_layout  # lazy: see the module docstring

    # lazy: see the module docstring
    from qualiteacher.eval.detection import detections_from_csv, evaluate_detections, ground_truths_from_records

    options = {"split": args.split} if args.split else {}
    truths = ground_truths_from_records(read_layout(args.layout, Path(args.root), **options))
    result = evaluate_detections(detections_from_csv(args.detections), truths,
                                 iou_threshold=args.iou, unknown_images="ignore")
    for name, ap in sorted(result.ap.items()):
        say(f"{name:12s} AP {ap:.4f}  ({result.num_gt.get(name, 0)} objects)", "quiet")
    say(f"mAP@{args.iou:g}: {result.mean_ap:.4f} over {len(truths)} annotated images", "quiet")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    return run_evaluate(args)


def _compare(args: argparse.Namespace) -> int:
    return run_compare(args)


def _study(args: argparse.Namespace) -> int:
    return run_study_cli(args)


def _app(args: argparse.Namespace) -> int:
    return run_app(args)


def _pipeline(args: argparse.Namespace, extra: list[str]) -> int:
    from qualiteacher.pipeline.cli import run_pipeline_cli  # lazy: see the module docstring

    return run_pipeline_cli(args.task, extra)


def _add_data_commands(sub: Any) -> None:
    """``data demo`` and ``data check``."""
    data = sub.add_parser("data", help="data sets: build the embedded demo data, check a folder")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    demo = data_sub.add_parser("demo", help="synthesise the offline demo data set for every task")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=96, help="side of every demo image in pixels")
    demo.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    demo.add_argument("--overwrite", action="store_true", help="replace existing demo data in --out")
    helps = {"clean": "clean images, shared by the tasks (default: the demo's)",
             "unseen": "real-domain pairs per task cut from photos no other split uses (default: the demo's)"}
    for split in _DEMO_SPLITS:  # val and unseen have their own draws: their counts leave the others' bytes
        demo.add_argument(f"--n-{split}", type=int, metavar="N",
                          help=helps.get(split, f"{split} images per task (default: the demo's)"))
    demo.set_defaults(handler=_data_demo)
    check = data_sub.add_parser("check", help="read every image of a data set and report bad files")
    check.add_argument("root")
    check.add_argument("--layout", default="unpaired",
                       help="paired, unpaired, real3000, rtts, exdark, realsnow")
    check.add_argument("--max-pixels", type=int, default=None, help=_MAX_PIXELS_HELP)
    check.set_defaults(handler=_data_check)


def _add_iqa_commands(sub: Any) -> None:
    """``iqa fit-niqe``, ``iqa audit`` and ``iqa list``."""
    iqa = sub.add_parser("iqa", help="IQA ensemble utilities")
    iqa_sub = iqa.add_subparsers(dest="iqa_command", metavar="ACTION", required=True)
    fit = iqa_sub.add_parser("fit-niqe", help="fit NIQE pristine statistics on a folder of clean images")
    fit.add_argument("folder")
    fit.add_argument("--out", required=True, help="output file for the pristine model")
    fit.add_argument("--block-size", type=int, default=96)
    fit.set_defaults(handler=_iqa_fit_niqe)
    aud = iqa_sub.add_parser("audit", help="does an ensemble rank degraded and destroyed images below clean ones?")
    aud.add_argument("--preset", default="offline", help="IQA preset name or a YAML file of members")
    aud.add_argument("--task", required=True, choices=TASKS)
    aud.add_argument("--images", default=None, help="folder of your own clean photos (default: bundled photos, "
                     "split into tune and report photos)")
    aud.add_argument("--demo-data", default="demo_data",
                     help="demo data folder whose test / val ground truth joins the bundled photos (if it exists)")
    aud.add_argument("--out", default="iqa_audit", help="report folder (CSV, Markdown, figure)")
    aud.add_argument("--size", type=int, default=96, help="side of the square crops in pixels")
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--weights-dir", default=None, help="folder holding the members' weight files")
    aud.add_argument("--random-weights", action="store_true",
                     help="members that need downloaded weights get random ones (code path only: meaningless scores)")
    aud.add_argument("--checkpoint", default=None, metavar="CKPT",
                     help="a stage-3 checkpoint: also pair each clean photo with its student's restoration of it "
                          "(row trained_student; a grader should not pay for reworking a photo that needed nothing)")
    aud.add_argument("--strict", action="store_true", help="exit 1 when the fused score fails the audit")
    aud.set_defaults(handler=_iqa_audit)
    lst = iqa_sub.add_parser("list", help="list ensemble presets")
    lst.set_defaults(handler=_iqa_list)


def _add_score_command(sub: Any) -> None:
    """``score``."""
    score = sub.add_parser("score", help="score a folder of images with an IQA ensemble")
    score.add_argument("folder")
    score.add_argument("--preset", default="offline")
    score.add_argument("--task", default=None, choices=TASKS)
    score.add_argument("--out", default=None, help="CSV or parquet file for the scores")
    score.add_argument("--cache", default=None, help="parquet score cache (default: in the project cache)")
    score.add_argument("--weights-dir", default=None, help="folder with local IQA weight files (pyiqa's file names)")
    score.add_argument("--max-pixels", type=int, default=None, help=_MAX_PIXELS_HELP)
    score.add_argument("--max-side", type=int, default=None,
                       help="grade larger images downscaled to this longer side, read in 8 bits (bounded memory; "
                            "default 1024; 0: full size)")
    score.set_defaults(handler=_score)


def _add_restore_command(sub: Any) -> None:
    """``restore``."""
    rest = sub.add_parser("restore", help="restore a folder of images with a trained student")
    rest.add_argument("input", help="folder of images")
    rest.add_argument("--checkpoint", required=True, help="stage-3 checkpoint (OUT/stage3/final.ckpt)")
    rest.add_argument("--out", required=True, help="output folder (PNG)")
    rest.add_argument("--level", type=int, default=7, help="requested quality level (0..7)")
    rest.add_argument("--teacher", action="store_true", help="use the EMA teacher instead (unconditioned)")
    rest.add_argument("--w", type=float, default=None,
                      help="fidelity weight in [0, 1] of an IQPIR student with a fidelity path (0: pure codebook "
                           "prior, 1: most faithful; default: the checkpoint's stage3.model.fidelity_w)")
    rest.add_argument("--tile", type=int, default=None,
                      help="tile size (e.g. the training crop; 0: never; default: the architecture's, 128 px "
                           "for the demo model, 512 for the paper one)")
    rest.add_argument("--max-memory", default=None, help=_MAX_MEMORY_HELP)
    rest.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    rest.add_argument("--max-pixels", type=int, default=None, help=_MAX_PIXELS_HELP)
    rest.set_defaults(handler=_restore)


def _add_detmap_command(sub: Any) -> None:
    """``detmap``."""
    det = sub.add_parser("detmap", help="VOC detection mAP of your detector's detections (RTTS, ExDark)")
    det.add_argument("root", help="data set root (rtts or exdark layout)")
    det.add_argument("--detections", required=True, help="CSV: image_id,label,score,x1,y1,x2,y2")
    det.add_argument("--layout", default="rtts", choices=("rtts", "exdark"))
    det.add_argument("--split", default=None, help="ExDark split: train, val, test or all")
    det.add_argument("--iou", type=float, default=0.5)
    det.set_defaults(handler=_detmap)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(  # a wrong invocation: one line, exit code 2
        prog="qualiteacher",
        description="Quality-conditioned Mean-Teacher training for real-world image restoration.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (allowed anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for add in (_add_data_commands, _add_iqa_commands, _add_score_command, _add_restore_command, _add_detmap_command):
        add(sub)

    ev = sub.add_parser("evaluate", help="restore a benchmark's test split and report NR-IQA, PSNR/SSIM, mAP",
                        description="Restore a test split with trained checkpoints (and baselines) and report "
                                    "NR-IQA metrics, the fused ensemble score, PSNR/SSIM where references exist "
                                    "and, with a detector, mAP@0.5 and mAP@[.5:.95] (RTTS, ExDark).")
    add_evaluate_arguments(ev)
    ev.set_defaults(handler=_evaluate)
    cmp = sub.add_parser("compare", help="several evaluations' results side by side (Markdown, like a paper's table)")
    add_compare_arguments(cmp)
    cmp.set_defaults(handler=_compare)

    st = sub.add_parser("study", help="QualiTeacher vs supervised / Mean Teacher / ablations over seeds (table + figure)",
                        description="From one shared warm-up per seed, train the chosen stage-3 modes for the same "
                                    "steps, measure them on the held-out test split (PSNR, SSIM, every ensemble "
                                    "member, a held-out member, the level dial) and write a table (mean ± std over "
                                    "seeds), a figure and a per-run CSV. Rerun the same command to resume.")
    add_study_arguments(st)
    st.set_defaults(handler=_study)

    app = sub.add_parser("app", help="a local web page: restore an image at any quality level, see its scores",
                         description="Serve a Gradio page (on 127.0.0.1 by default) for a trained model: "
                                     "upload an image, move the quality-level (and fidelity) sliders, compare "
                                     "input and output and every IQA member's score, sweep all levels.")
    add_app_arguments(app)
    app.set_defaults(handler=_app)

    pipe = sub.add_parser(
        "pipeline", add_help=False,
        help="run a task's staged recipe (stage 1 → 2 → 3 → evaluation → registration); "
             "`qualiteacher pipeline TASK --help` for its options",
    )
    pipe.add_argument("task", choices=TASKS + ("all",))
    pipe.set_defaults(handler=_pipeline, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Expected errors (missing files, bad values, refused checkpoints, an
    unreachable tracking server ...) print one line on stderr and return 2; ``--debug`` (anywhere
    on the line) shows their traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if argv[:1] == ["pipeline"]:
        # the pipeline parses its own options (LightningCLI-style overrides)
        args, extra = parser.parse_known_args(argv)
        extra += ["--debug"] if debug else []
        return run_with_contract(lambda: _pipeline(args, extra), debug)
    args = parser.parse_args(argv)
    args.debug = debug
    handler: Callable[[argparse.Namespace], int] = args.handler
    return run_with_contract(lambda: handler(args), debug)


if __name__ == "__main__":
    sys.exit(main())
