"""Benchmark: tiled restoration of a large photo with bounded memory (not a test).

    python pipelines/benchmark_restore.py --size 2048 --preset base --tile 96

Restores a synthetic ``size``×``size`` image with an IQPIR (or U-Net) student in tiles and reports
time, the peak resident memory of the process (CPU) or peak allocated memory (CUDA), and the
largest difference from an untiled restoration of a crop that fits in one tile.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from qualiteacher.training.restore import restore
from qualiteacher.training.students import build_student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--preset", default="base")
    p.add_argument("--student", default="iqpir", choices=("iqpir", "unet"))
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--tiles-per-batch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    net = build_student(args.student, args.preset).to(args.device).eval()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, args.size), torch.linspace(0, 1, args.size), indexing="ij")
    image = torch.stack([xx, yy, (xx * yy).sqrt()])[None].to(args.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = restore(net, image, level=7, tile=args.tile, tiles_per_batch=args.tiles_per_batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    crop = image[..., : args.tile, : args.tile]
    diff = (restore(net, crop, level=7, tile=args.tile) - restore(net, crop, level=7)).abs().max().item()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"{args.student}/{args.preset}, {args.size}x{args.size} in {args.tile}-px tiles: {dt:.1f} s, "
          f"output {tuple(out.shape)}, peak memory {peak:.0f} MiB (process before: {rss0:.0f} MiB), "
          f"tiled vs untiled on one tile: max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
