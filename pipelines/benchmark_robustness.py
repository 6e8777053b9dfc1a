"""Peak memory and time of scoring and restoring a folder of hostile images (a benchmark, not a test).

    python pipelines/benchmark_robustness.py [--uncapped] [--keep DIR]

Builds the edge-case folder (`qualiteacher.data.edge_cases`: an ordinary image, a constant image,
a 1 x 1, a 20000 x 8 strip, a 17.6-KB PNG declaring 12000 x 12000 px, a text file, a folder and a
dangling link named like images) and a tiny stage-3 checkpoint, then runs each command in its own
process and reports its exit code, wall time and peak resident memory (``wait4`` rusage of that
process). Rows: the import floor (torch + the IQA ensemble + Lightning, no work), ``data check``,
``score`` (offline ensemble), ``restore`` (tiny U-Net student), and the tracking pre-flight against
a closed port. ``--uncapped`` adds ``data check --max-pixels 0``: the PNG bomb decoded in full,
what the pixel cap saves (about 3 GB; leave it out on small machines).
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
    args = p.parse_args()
    from qualiteacher.data.edge_cases import build_edge_case_folder

    work = Path(args.keep or tempfile.mkdtemp(prefix="qt-robustness-"))
    work.mkdir(parents=True, exist_ok=True)
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
    if args.uncapped:
        rows.append(("data check --max-pixels 0 (bomb decoded)", [*cli, "data", "check", str(folder), "--max-pixels", "0"]))
    print(f"folder {folder}: " + "; ".join(f"{k}: {v}" for k, v in what.items()))
    print("\n| run | exit | wall s | peak RSS MiB | note |\n|---|---|---|---|---|")
    for name, argv in rows:
        code, wall, rss, last = _run(argv, env)
        note = last if name.startswith("tracking") else ""
        print(f"| {name} | {code} | {wall:.1f} | {rss:.0f} | {note} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
