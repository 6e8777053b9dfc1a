"""Cost per image of IQA presets side by side (interleaved in one process, so a shared machine's
load hits every preset alike): scores (no grad), reward + backward, and each member's scores.

    python pipelines/benchmark_iqa_presets.py --presets offline_v1 offline --task dehaze --sizes 96 256

Prints milliseconds per image (median over ``--repeats`` rounds, batch ``--batch``).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Callable

import torch

from qualiteacher.iqa import build_ensemble


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["offline_v1", "offline"])
    parser.add_argument("--task", default="dehaze")
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 256])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensembles = {p: build_ensemble(p, task=args.task) for p in args.presets}
    print(f"task {args.task}, batch {args.batch}, torch threads {args.threads}; ms per image (median of {args.repeats})")
    for size in args.sizes:
        x = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        jobs: dict[str, Callable[[], object]] = {}
        for name, ens in ensembles.items():
            jobs[f"{name}: scores"] = lambda ens=ens: ens(x)
            jobs[f"{name}: reward+backward"] = lambda ens=ens: ens.reward(x.clone().requires_grad_(True)).sum().backward()
            for spec in ens.specs:
                def member(ens=ens, spec=spec) -> None:
                    with torch.no_grad():
                        ens._raw_score(spec, x)

                jobs[f"{name}:   {spec.name}"] = member
        for fn in jobs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.repeats):  # rounds interleave every job
            for key, fn in jobs.items():
                times[key].append(_seconds(fn))
        print(f"\n{size} px")
        for key, values in times.items():
            print(f"  {key:<36}{1000 * sorted(values)[len(values) // 2] / args.batch:9.2f} ms")


if __name__ == "__main__":
    main()
