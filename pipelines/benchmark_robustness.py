"""Robustness: a hostile folder and a careless user's invocations, each in its own process.

    python pipelines/benchmark_robustness.py [--uncapped] [--keep DIR] [--probes-only | --resources-only]

Part 1, resources: peak memory and time of scoring and restoring the edge-case folder
(`qualiteacher.data.edge_cases`: an ordinary image, a constant image, a 1 x 1, a 20000 x 8 strip, a
17.6-KB PNG declaring 12000 x 12000 px, a text file, a folder and a dangling link named like
images) with a tiny stage-3 checkpoint: each command's exit code, wall time and peak resident
memory (``wait4`` rusage of that process). Rows: the import floor (torch + the IQA ensemble +
Lightning, no work), ``data check``, ``score`` (offline ensemble), ``restore`` (tiny U-Net student),
and the tracking pre-flight against a closed port. ``--uncapped`` adds ``data check --max-pixels
0``: the PNG bomb decoded in full, what the pixel cap saves (about 3 GB; leave it out on small
machines).

Part 2, probes (issue 27, "safe at the edges"): one row per probe, ``probe | expected | got | pass``;
the exit code is 1 when any row fails. The probes run tiny pipelines (U-Net student, ``tiny``
preset) on a small demo set: crafted IQA weight files and a planted ``last.ckpt`` (with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), settings changed under ``--from-stage``, paired evaluation
of an 8-px image and a 20000 x 8 strip, the MLflow store and its artifact store made read-only in
the middle of stage 3 (root drops ``CAP_DAC_OVERRIDE`` with ``setpriv`` for it), two pipelines in
one folder, an absurd batch size, an escaping ``MLmodel`` data path, ``--metrics auto`` offline, a
GPU that is not there, wrong invocations, the study's bank folders and the browser test without
Chromium. The guarantees are listed in docs/safety.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(argv: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS in MiB, last stdout line) of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        lines = [ln.strip() for ln in out.read().splitlines() if ln.strip()]
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024, lines[-1] if lines else ""  # KiB


def _checkpoint(path: Path) -> Path:
    import torch
    from torch import nn

    from qualiteacher.training.stage3 import QualiTeacherModule

    torch.manual_seed(0)
    module = QualiTeacherModule(student="unet", preset="tiny", ensemble=nn.Identity())
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pseudo_label_bank": module.bank.state_dict()}, path)
    return path


_PREFLIGHT = """import time
from qualiteacher.tracking.mlflow_logger import check_tracking_uri
t = time.perf_counter()
try:
    check_tracking_uri({uri!r})
except ConnectionError:
    print(f"the check itself: {{time.perf_counter() - t:.2f}} s")
    raise SystemExit(2)
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uncapped", action="store_true", help="also decode the PNG bomb with the cap off (~3 GB)")
    p.add_argument("--keep", default=None, help="work in this folder (default: a temporary one)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--probes-only", action="store_true", help="part 2 only")
    part.add_argument("--resources-only", action="store_true", help="part 1 only")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="qt-robustness-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.probes_only:
        resources(work, args.uncapped)
    if args.resources_only:
        return 0
    from robustness_probes import run_probes  # pipelines/robustness_probes.py, beside this script

    return 0 if run_probes(work / "probes") else 1


def resources(work: Path, uncapped: bool) -> None:
    """Part 1: exit code, wall time and peak RSS of each command on the edge-case folder."""
    from qualiteacher.data.edge_cases import build_edge_case_folder

    folder = work / "hostile"
    what = build_edge_case_folder(folder)
    ckpt = _checkpoint(work / "stage3.ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "QUALITEACHER_HOME": os.environ.get("QUALITEACHER_HOME", str(work / "home"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [sys.executable, "-m", "qualiteacher.cli"]
    uri = f"http://127.0.0.1:{_closed_port()}"
    rows = [
        ("import floor (torch, IQA ensemble, Lightning; no work)",
         [sys.executable, "-c", "import torch, lightning, qualiteacher.iqa.presets, qualiteacher.training.stage3"]),
        ("data check (pixel cap 64 MP)", [*cli, "data", "check", str(folder)]),
        ("score, offline ensemble, task dehaze", [*cli, "score", str(folder), "--task", "dehaze",
                                                  "--out", str(work / "scores.csv"), "--cache", str(work / "c.parquet")]),
        ("restore, U-Net tiny student", [*cli, "restore", str(folder), "--checkpoint", str(ckpt),
                                         "--out", str(work / "restored")]),
        (f"tracking pre-flight, closed port ({uri})",
         [sys.executable, "-c", _PREFLIGHT.format(uri=uri)]),
    ]
    if uncapped:
        rows.append(("data check --max-pixels 0 (bomb decoded)", [*cli, "data", "check", str(folder), "--max-pixels", "0"]))
    print(f"folder {folder}: " + "; ".join(f"{k}: {v}" for k, v in what.items()))
    print("\n| run | exit | wall s | peak RSS MiB | note |\n|---|---|---|---|---|")
    for name, argv in rows:
        code, wall, rss, last = _run(argv, env)
        note = last if name.startswith("tracking") else ""
        print(f"| {name} | {code} | {wall:.1f} | {rss:.0f} | {note} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
