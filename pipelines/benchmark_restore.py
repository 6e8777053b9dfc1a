"""Benchmark: restoring a photo with the defaults a user gets: peak memory and speed against size.

    python pipelines/benchmark_restore.py                      # demo checkpoint + paper architecture, 0.25-12 MP
    python pipelines/benchmark_restore.py --models paper --device cuda --tile 512 --tiles-per-batch 8 --bf16

For every model, device and size (megapixels, 4:3 photos), a fresh subprocess does what
``qualiteacher restore`` does with one photo: read the PNG in 8 bits, restore it at level 7 with
the default tile and memory budget (or the ones given), write the PNG. Its peak resident memory
is therefore that size's own. Models: ``demo`` is the demo pipeline's stage-3 checkpoint
(``--checkpoint``, default ``outputs/dehaze/stage3/final.ckpt``) or, without one, the ``demo``
preset's IQPIR with random weights; ``paper`` is the ``paper`` preset's IQPIR with random weights
(the cost does not depend on the weights). Devices: ``cpu`` and, when there is one, ``cuda``.

Prints a Markdown table and one JSON line ``{"benchmark": "restore", "machine": ..., "rows": [...]}``;
each row: model, device, size, tile, budget, restore seconds (wall and process CPU), megapixels
per second, seconds per megapixel relative to the 1-MP photo, peak RSS (and CUDA peak) in MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SIZES = (0.25, 1.0, 4.0, 12.0)
DEMO_CHECKPOINT = "outputs/dehaze/stage3/final.ckpt"


def photo_size(megapixels: float) -> tuple[int, int]:
    """(height, width) of a 4:3 photo of about ``megapixels``."""
    w = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    return round(w * 3 / 4), w


def write_photo(path: Path, height: int, width: int) -> Path:
    """A synthetic photo: smooth gradients, a pattern and a little noise (PNG, fast compression)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    rows = []
    for start in range(0, height, 512):  # in bands: no full-size float image
        yy = y[start:start + 512]
        chans = [0.2 + 0.6 * x + 0 * yy, 0.3 + 0.5 * yy + 0 * x, 0.5 + 0.3 * np.sin(20 * x + 13 * yy)]
        band = np.stack(chans, -1) + rng.normal(0, 0.02, (yy.shape[0], width, 3)).astype(np.float32)
        rows.append((band.clip(0, 1) * 255).astype(np.uint8))
    Image.fromarray(np.concatenate(rows)).save(path, compress_level=1)
    return path


def machine() -> str:
    """CPU model and core count (and the GPU when torch sees one)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _rss_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """One restoration in this process (the subprocess side): the row of the table."""
    import resource

    import torch

    from qualiteacher.data.io import write_image
    from qualiteacher.iqa.bounded import read_uint8
    from qualiteacher.training.memory import resolve_budget
    from qualiteacher.training.restore import inference_ready, load_for_inference, plan_restore, restore
    from qualiteacher.training.students import build_student

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    if spec["checkpoint"]:
        net, source = load_for_inference(spec["checkpoint"]).student, spec["checkpoint"]
    else:
        prior = spec.get("fusion_prior") or None
        net = build_student("iqpir", spec["model"], fusion_prior=prior)
        source = f"{spec['model']} preset, random weights" + (f", fusion prior {prior}" if prior else "")
    net = inference_ready(net.to(device))  # what the loaders give a user
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _rss_mib("VmRSS")
    budget = resolve_budget(spec["max_memory"], device)
    start = time.perf_counter()
    x = torch.from_numpy(read_uint8(spec["photo"])).permute(2, 0, 1)[None]
    read_s = time.perf_counter() - start
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
        y = restore(net, x, level=7, tile=spec["tile"], max_memory=budget, tiles_per_batch=spec["tiles_per_batch"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    plan = plan_restore(net, x, spec["tile"], None, budget, spec["tiles_per_batch"])  # the probe is remembered
    tflops = _tflops_per_s(net, plan, spec["bf16"], device, wall) if spec.get("flops") else None
    start = time.perf_counter()
    write_image(Path(spec["photo"]).with_name("restored.png"), y)
    write_s = time.perf_counter() - start
    h, w = x.shape[-2:]
    mp = h * w / 1e6
    return {"model": spec["model"], "source": source, "device": spec["device"], "bf16": spec["bf16"],
            "megapixels": round(mp, 2), "height": h, "width": w, "tile": "x".join(map(str, plan.grid.tile)),
            "tiles": len(plan.grid.ys) * len(plan.grid.xs), "tiles_per_batch": plan.positions,
            "budget_mib": round(budget / 2**20), "threads": torch.get_num_threads(),
            "restore_s": round(wall, 2), "restore_cpu_s": round(cpu, 2), "read_s": round(read_s, 2),
            "write_s": round(write_s, 2), "mp_per_s": round(mp / wall, 3), "s_per_mp": round(wall / mp, 2),
            "base_rss_mib": round(base), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "cuda_peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "tflops_per_s": tflops}


def _tflops_per_s(net: Any, plan: Any, bf16: bool, device: Any, seconds: float) -> float:
    """Counted FLOPs of the restoration per second: one tile's forward counted (matmuls and
    convolutions), times the tiles the image took, over the restore's seconds."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    tile = torch.rand(1, 3, *plan.grid.tile, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        net(tile, torch.full((1,), 7, device=device))
    return round(counter.get_total_flops() * len(plan.grid.ys) * len(plan.grid.xs) / seconds / 1e12, 3)


def table(rows: list[dict]) -> str:
    """Markdown: one row per model, device and size; time per pixel relative to the 1-MP photo
    (CPU seconds on a CPU: other processes on a shared machine stretch wall time, not CPU time)."""
    lines = ["| model | device | MP | tile (per batch) | wall s | CPU s | MP/s | s/MP vs 1 MP | peak RSS MiB | CUDA peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = "restore_cpu_s" if r["device"] == "cpu" else "restore_s"
        ref = next((o for o in rows if o["model"] == r["model"] and o["device"] == r["device"]
                    and abs(o["megapixels"] - 1) < 0.05), None)
        rel = f"{(r[key] / r['megapixels']) / (ref[key] / ref['megapixels']):.2f}" if ref else "–"
        lines.append(f"| {r['model']} | {r['device']}{' bf16' if r['bf16'] else ''} | {r['megapixels']} | "
                     f"{r['tile']} ({r['tiles_per_batch']}) | {r['restore_s']} | {r['restore_cpu_s']} | "
                     f"{r['mp_per_s']} | {rel} | {r['peak_rss_mib']} | "
                     f"{r['cuda_peak_mib'] if r['cuda_peak_mib'] is not None else '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=list(DEFAULT_SIZES), help="megapixels (4:3 photos)")
    p.add_argument("--models", nargs="+", default=["demo", "paper"], choices=("demo", "paper", "base", "tiny"))
    p.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: cpu, and cuda when present)")
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT,
                   help="stage-3 checkpoint of the demo model (random demo weights when the file is missing)")
    p.add_argument("--tile", type=int, default=None, help="tile side (default: the architecture's)")
    p.add_argument("--tiles-per-batch", type=int, default=None, help="at most this many tiles per batch")
    p.add_argument("--max-memory", default=None, help="memory budget (default: the machine's, as restore)")
    p.add_argument("--fusion-prior", default="dcp",
                   help="classical restorer in the random-weight models' image fusion (default dcp, the dehaze "
                        "configuration's; 'none': without)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--flops", action="store_true", help="also count the FLOPs per second (one tile counted)")
    p.add_argument("--json-out", default=None, help="also write the JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.fusion_prior = None if args.fusion_prior in ("none", "") else args.fusion_prior
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    import torch

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qt-bench-restore-") as tmp:
        for mp in args.sizes:
            h, w = photo_size(mp)
            folder = Path(tmp) / f"{mp:g}mp"
            folder.mkdir()
            photo = write_photo(folder / "photo.png", h, w)
            for model in args.models:
                ckpt = args.checkpoint if model == "demo" and Path(args.checkpoint).is_file() else None
                for device in devices:
                    spec = {"model": model, "checkpoint": ckpt, "device": device, "photo": str(photo),
                            "tile": args.tile, "tiles_per_batch": args.tiles_per_batch,
                            "max_memory": args.max_memory, "bf16": args.bf16, "flops": args.flops,
                            "fusion_prior": args.fusion_prior}
                    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                         capture_output=True, text=True, check=False)
                    if run.returncode != 0:
                        print(f"[bench] {model} {device} {mp:g} MP failed: {run.stderr.strip()[-800:]}", file=sys.stderr)
                        continue
                    rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
                    print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
            photo.unlink()
    result = {"benchmark": "restore", "machine": machine(), "torch": torch.__version__,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}
    print(table(rows))
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
