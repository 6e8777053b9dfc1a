"""Benchmark: the pseudo-label bank's RAM, checkpoint and disk against the number of unlabeled ids
(not a test).

    python pipelines/benchmark_bank.py                       # 100, 1,000, 10,000 ids, 512-px entries
    python pipelines/benchmark_bank.py --sizes 100 1000 --old-max 1000 --max-disk-gb 4   # more RAM/disk

Two banks, each in its own process (both run at once): ``old`` keeps every entry's pixels in RAM and inside the
checkpoint (``MemoryStore``, what stage 3 did before the disk bank); ``new`` keeps them as files
(``DiskStore``, the pipeline's default) and only the index in RAM and checkpoints. For each size
the bank is filled with ``k`` synthetic entries per id (uint8 image + mask, what stage 3 stores),
then a short stage-3-like loop runs (gather a batch, offer better candidates, checkpoint, collect),
and the process' resident memory (RSS), the checkpoint file and the bank folder are measured.

Sizes grow in one process (ids are added), so RSS differences between rows are the cost of the
added ids. Where the entry files would pass ``--max-disk-gb`` the remaining ids get ``--small-px``
entries (RAM and checkpoint of the new bank do not depend on the entry size; its disk column is
then the measured bytes per entry times the entries, marked "extrapolated"). The old bank is
measured up to ``--old-max`` ids (it needs ``k`` × 1 MB of RAM per 512-px id) and extrapolated
linearly beyond.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> tuple[float, float]:
    # current and peak resident set of this process (Linux /proc), after glibc returns freed heap
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.npy")) if root.is_dir() else 0


def worker(kind: str, sizes: list[int], px: int, small_px: int, k: int, max_disk_gb: float, work: Path) -> None:
    """Fill one bank up to each size in turn and print one JSON line per size."""
    import torch

    from qualiteacher.teacher import DiskStore, PseudoLabelBank

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    store = DiskStore(work / "bank", cache_entries=64) if kind == "new" else None
    bank = PseudoLabelBank(k, store)
    base_rss, _ = _rss_mb()
    entry_bytes = {px: 4 * px * px + 128}  # .npy: (4, px, px) uint8 plus its header
    done, written, batch, small_from = 0, 0, 8, None  # small_from: first id with small entries
    noise: dict[int, torch.Tensor] = {}
    for n in sizes:
        t0 = time.perf_counter()
        while done < n:
            ids = [f"img{i:06d}" for i in range(done, min(n, done + batch))]
            small = kind == "new" and (written + k * len(ids)) * entry_bytes[px] > max_disk_gb * 2**30
            side = small_px if small else px
            if small and small_from is None:
                small_from = done
            if side not in noise:
                noise[side] = torch.randint(0, 256, (batch, 4, side, side), dtype=torch.uint8, generator=gen)
            for round_ in range(k):  # k candidates per id, each better than the last
                b = len(ids)
                pixels = noise[side][:b] + (done + round_) % 251  # distinct content, cheap (uint8 wraps)
                scores = torch.full((b,), 0.1 + 0.2 * round_, dtype=torch.float64)
                bank.offer_batch(ids, pixels[:, :3].float() / 255, pixels[:, 3:].float() / 255, scores,
                                 torch.full((b,), round_, dtype=torch.long))
            written += k * len(ids) if side == px else 0
            done += len(ids)
        # a short stage-3-like loop: gather a batch, offer a better candidate for half of it
        for step in range(10):
            lo = 0 if small_from is None else small_from  # one entry size per batch
            ids = [f"img{int(i):06d}" for i in torch.randint(lo, n, (batch,), generator=gen)]
            got = bank.gather(ids)
            best = slice(0, batch // 2 * k, k)  # the best entry of the first half of the batch
            m = batch // 2
            bank.offer_batch(ids[:m], 1 - got.images[best], got.masks[best],
                             torch.full((m,), 0.9 + 0.001 * step, dtype=torch.float64),
                             torch.full((m,), 7, dtype=torch.long))
        ckpt = work / f"{kind}_{n}.ckpt"
        torch.save({"pseudo_label_bank": bank.state_dict()}, ckpt)
        bank.mark_checkpoint()
        bank.collect_garbage()
        rss, peak = _rss_mb()
        extrapolated = kind == "new" and written < k * n
        disk = 0 if kind == "old" else k * n * entry_bytes[px] if extrapolated else _folder_bytes(work / "bank")
        print(json.dumps({"kind": kind, "ids": n, "rss_mb": rss - base_rss, "peak_mb": peak - base_rss,
                          "ckpt_mb": ckpt.stat().st_size / 2**20, "disk_mb": disk / 2**20,
                          "disk_extrapolated": extrapolated, "seconds": time.perf_counter() - t0}), flush=True)
        ckpt.unlink()


def _start_worker(kind: str, sizes: list[int], args: argparse.Namespace, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", kind, "--sizes", *map(str, sizes), "--px", str(args.px),
           "--small-px", str(args.small_px), "--k", str(args.k), "--max-disk-gb", str(args.max_disk_gb),
           "--work", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rows(kind: str, proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} bank worker failed ({proc.returncode}): {err[-2000:]}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _growth(rows: list[dict], key: str) -> list[str]:
    # per added id, between consecutive rows
    out, prev = [], None
    for r in rows:
        out.append("" if prev is None else f"{(r[key] - prev[key]) * 2**20 / (r['ids'] - prev['ids']) / 1024:.2f}")
        prev = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--px", type=int, default=512, help="entry side in pixels")
    p.add_argument("--small-px", type=int, default=32, help="entry side once --max-disk-gb is reached")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--old-max", type=int, default=300, help="largest size measured for the old bank")
    p.add_argument("--max-disk-gb", type=float, default=1.0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--worker", choices=("old", "new"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = sorted(args.sizes)
    if args.worker:
        worker(args.worker, sizes, args.px, args.small_px, args.k, args.max_disk_gb, Path(args.work))
        return
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="qt-bank-bench-"))
    try:
        # one process per bank (each its own RSS), both at once
        old_sizes = sorted({n for n in sizes if n <= args.old_max} | {args.old_max})
        procs = {"old": _start_worker("old", old_sizes, args, work / "old"),
                 "new": _start_worker("new", sizes, args, work / "new")}
        old, new = _rows("old", procs["old"]), _rows("new", procs["new"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if old and len(old) >= 2:  # extrapolate the old bank linearly from its last two measured rows
        a, b = old[-2], old[-1]
        for n in (n for n in sizes if n > args.old_max):
            f = (n - b["ids"]) / (b["ids"] - a["ids"])
            old.append({"kind": "old", "ids": n, "extrapolated": True,
                        **{key: b[key] + f * (b[key] - a[key]) for key in ("rss_mb", "peak_mb", "ckpt_mb")},
                        "disk_mb": 0.0, "seconds": float("nan")})
    print(f"pseudo-label bank, k = {args.k}, {args.px}-px entries ({time.perf_counter() - t0:.0f} s)\n")
    print("| bank | ids | RSS growth MB | KB per added id | checkpoint MB | KB per added id | bank folder MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rows in (old, new):
        for r, rss_id, ck_id in zip(rows, _growth(rows, "rss_mb"), _growth(rows, "ckpt_mb")):
            mark = " (extrapolated)" if r.get("extrapolated") else ""
            disk = f"{r['disk_mb']:.0f}" + (" (extrapolated)" if r.get("disk_extrapolated") else "")
            print(f"| {r['kind']}{mark} | {r['ids']:,} | {r['rss_mb']:.1f} | {rss_id} | {r['ckpt_mb']:.2f} | "
                  f"{ck_id} | {disk} |")
    if args.out:
        Path(args.out).write_text(json.dumps(old + new, indent=2))


if __name__ == "__main__":
    main()
