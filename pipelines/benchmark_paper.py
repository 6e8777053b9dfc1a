"""The paper path at its real size with stand-in weights: seconds per step and peak memory per stage.

Runs the `paper` preset's pipeline (data, stage 1, stage 2, fidelity, stage 3, eval, register) for a
few steps per stage on generated demo data, with the paper ensemble's members on random weights
(QUALITEACHER_RANDOM_IQA=1: every score is meaningless, only the cost is measured) and a random
stand-in VGG16 for the stage-1 perceptual loss unless ``--vgg`` gives the real file. Nothing is
downloaded. One stage at a time, so each stage's CUDA peak memory is its own. Seconds per step come
from the MLflow metric timestamps of the stage's run (every batch logs), after ``--warmup`` batches.

    python pipelines/benchmark_paper.py --out outputs/paper_bench              # GPU: 512 px, batch 8, bf16
    python pipelines/benchmark_paper.py --out /tmp/pb --arch paper-smoke --size 64 --batch 2 --steps 3 \\
        --precision 32 --stage3-crop 64                                        # CPU plumbing check

Writes ``OUT/paper_bench.md`` and ``OUT/paper_bench.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def _stand_in_vgg16(path: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features[:23]  # up to relu4_3
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def _config(args: argparse.Namespace, out: Path) -> Path:
    """The paper preset's sizes and step counts for the benchmark, as a config file."""
    n = args.steps
    data = {"batch_size": args.batch, "num_workers": args.workers}
    trainer = {"max_steps": n}
    if args.precision:
        trainer["precision"] = args.precision
    vgg = args.vgg or str(_stand_in_vgg16(out / "vgg16_stand_in.pth"))
    arch = {"preset": args.arch}
    cfg = {
        "data_root": str(out / "data"), "out_dir": str(out / "run"), "progress": False,
        "checkpoint_every": 10 * n,
        "demo": {"size": args.size, "tasks": [args.task], "n_labeled": 4 * args.batch,
                 "n_unlabeled": 4 * args.batch, "n_test": 2, "n_clean": 2},
        "eval": {"max_images": 2, "levels": [0, 7], "grid_levels": [7]},
        "stage1": {"model": {**arch, "gan_start_step": n // 2, "perceptual_weights": vgg},
                   "data": {**data, "crop_size": args.size}, "trainer": trainer},
        "stage2": {"model": arch, "data": {**data, "crop_size": args.size}, "trainer": trainer},
        "fidelity": {"model": arch, "data": {**data, "crop_size": args.size}, "trainer": trainer},
        "stage3": {"model": {**arch, "pref_start_step": 1, "crop_start_step": 1},
                   "data": {**data, **({"crop_size": args.stage3_crop} if args.stage3_crop else {})},
                   "trainer": trainer},
    }
    path = out / "paper_bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _seconds_per_step(client: object, run_id: str, warmup: int) -> tuple[float, int]:
    """Mean seconds per training batch after ``warmup`` batches (metric timestamps of the run's
    most-logged metric; a stage-1 batch after ``gan_start_step`` is a generator and a
    discriminator step)."""
    run = client.get_run(run_id)
    best: list = []
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        if len(history) > len(best):
            best = history
    by_step = sorted({m.step: m.timestamp for m in best}.items())
    timed = by_step[warmup:] if len(by_step) > warmup + 1 else by_step
    if len(timed) < 2:
        return float("nan"), len(by_step)
    return (timed[-1][1] - timed[0][1]) / 1000 / (len(timed) - 1), len(by_step)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="dehaze")
    p.add_argument("--arch", default="paper", help="architecture preset (paper; paper-smoke on a CPU)")
    p.add_argument("--size", type=int, default=512, help="demo image size and stage 1/2/fidelity crop")
    p.add_argument("--stage3-crop", type=int, default=None, help="stage-3 crop (default: the preset's, 288)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per training stage")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the seconds-per-step figure")
    p.add_argument("--precision", default=None, help="trainer precision (default: the preset's bf16-mixed)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--vgg", default=None, help="real vgg16-397923af.pth (default: a random stand-in)")
    args = p.parse_args(argv)

    os.environ["QUALITEACHER_RANDOM_IQA"] = "1"  # stand-in members: the scores are meaningless
    os.environ["QUALITEACHER_OFFLINE"] = "1"
    import torch
    from mlflow import MlflowClient

    from qualiteacher.pipeline.api import resolve_config, run_pipeline, student_stages

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # the embedded MLflow store goes here
    cfg = resolve_config(args.task, "paper", [str(_config(args, out))])
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    for stage in student_stages(cfg.student):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        state = run_pipeline(cfg, only_stage=stage)
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        row = {"stage": stage, "wall_s": round(wall, 1), "peak_gib": round(peak, 2)}
        if stage in ("stage1", "stage2", "fidelity", "stage3"):
            client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
            sps, steps = _seconds_per_step(client, state["stages"][stage]["run_id"], args.warmup)
            row |= {"s_per_batch": round(sps, 3), "batches": steps}
        rows.append(row)
        print(f"[bench] {row}", flush=True)
    header = (f"paper path, stand-in weights (scores meaningless), {device}, torch {torch.__version__}: "
              f"arch {args.arch}, {args.size} px (stage 3: {cfg.stage3['data']['crop_size']} px), "
              f"batch {args.batch}, {cfg.stage3['trainer'].get('precision', '32')}, {args.steps} steps per stage")
    lines = [header, "", "| stage | batches | s/batch | peak GiB | stage wall s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r.get('batches', '–')} | {r.get('s_per_batch', '–')} | {r['peak_gib']} | "
                     f"{r['wall_s']} |")
    text = "\n".join(lines)
    (out / "paper_bench.md").write_text(text + "\n")
    (out / "paper_bench.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
