"""Throughput of the IQA ensemble: batched vs one image at a time, CPU and (if present) GPU + bf16.

    python pipelines/benchmark_iqa.py --preset offline --task dehaze --batch 32 --size 256
    python pipelines/benchmark_iqa.py --ladder      # also print the degradation-ladder table

Prints images/s of ``ensemble(x)`` (scores, no grad) and of ``ensemble.reward(x)`` + backward, per
member and fused. GPU timings are taken with ``torch.cuda.synchronize`` and bf16 autocast (members
compute in float32 inside).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from qualiteacher.iqa import Ensemble, build_ensemble


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def benchmark(ensemble: Ensemble, x: torch.Tensor, bf16: bool, repeats: int) -> dict[str, float]:
    """images/s for: batched scores, one-at-a-time scores, batched reward + backward, per member."""
    device = x.device
    ctx = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else torch.no_grad
    n = x.shape[0]

    def batched() -> None:
        with ctx():
            ensemble(x)

    def single() -> None:
        with ctx():
            for i in range(n):
                ensemble(x[i : i + 1])

    def reward() -> None:
        xr = x.detach().requires_grad_(True)
        with (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else torch.enable_grad()):
            r = ensemble.reward(xr)
        r.sum().backward()

    out = {
        "scores batched": n / time_it(batched, device, repeats),
        "scores 1-by-1": n / time_it(single, device, max(1, repeats // 2)),
        "reward+backward batched": n / time_it(reward, device, repeats),
    }
    for spec in ensemble.specs:
        def member(spec=spec) -> None:
            with torch.no_grad():
                ensemble._raw_score(spec, x)

        out[f"  member {spec.name}"] = n / time_it(member, device, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="offline")
    parser.add_argument("--task", default="dehaze")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--ladder", action="store_true", help="also print the ladder sanity table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ensemble = build_ensemble(args.preset, task=args.task)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    runs = [("cpu", torch.device("cpu"), False)]
    if torch.cuda.is_available():
        runs += [("cuda fp32", torch.device("cuda"), False), ("cuda bf16 autocast", torch.device("cuda"), True)]
    print(f"preset {args.preset} task {args.task}: {args.batch} images of {args.size} px, "
          f"members {[s.name for s in ensemble.specs]}, torch threads {torch.get_num_threads()}")
    for label, device, bf16 in runs:
        ensemble.to(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n[{label}] ({name})")
        for key, value in benchmark(ensemble, x.to(device), bf16, args.repeats).items():
            print(f"{key:<28}{value:>10.1f} img/s")
    ensemble.to("cpu")

    if args.ladder:
        from qualiteacher.iqa.sanity import GENERIC_KINDS, held_out_photos, ladder_summary, ladder_table

        table = ladder_table(ensemble, held_out_photos(128), [args.task, *GENERIC_KINDS])
        print("\nmean Spearman rho (1 = score falls with strength), 3 held-out photos at 128 px")
        print(ladder_summary(table).round(2).to_string())


if __name__ == "__main__":
    main()
