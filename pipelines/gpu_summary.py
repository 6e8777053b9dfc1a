"""The GPU check's one JSON file: seconds per step, the graders' share, peak memory and MFU.

    python pipelines/gpu_summary.py stage3-flops OUT/stage3_flops.json -- ARGS OF benchmark_stage3.py
    python pipelines/gpu_summary.py combine OUT          # OUT/gpu_check.json from the benchmarks' files

``stage3-flops`` builds the stage-3 step exactly as ``benchmark_stage3.py`` does (its own
``build_parts``) and counts the floating-point operations of one training step (the second, after
a warm-up step: teacher, graders, student, rewards, backward) with ``torch.utils.flop_counter``.
``combine`` reads ``OUT/paper/paper_bench.json`` (``benchmark_paper.py``), ``OUT/stage3.json`` (the
JSON line of ``benchmark_stage3.py``), ``OUT/stage3_flops.json`` and ``OUT/restore.json``
(``benchmark_restore.py --flops``) and writes ``OUT/gpu_check.json``. MFU = counted FLOPs per
second / the device's dense bf16 peak (table below; ``null`` for a device not in it). Matmul and
convolution FLOPs are counted (what the counter knows); elementwise work is not, so MFU is a
lower bound.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# dense bf16 tensor-core peak FLOP/s (vendor data sheets), by a substring of the device name
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12,
             "A10G": 70.0e12, "L4": 121.0e12}


def peak_flops(device: str) -> float | None:
    """The dense bf16 peak of ``device`` (a ``torch.cuda.get_device_name``), None when unknown."""
    return next((v for k, v in PEAK_BF16.items() if k in device), None)


def stage3_flops(out: str, argv: list[str]) -> dict[str, Any]:
    """FLOPs of one stage-3 training step as ``benchmark_stage3.py ARGV`` configures it."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmark_stage3 as b3

    args = b3.parse_args(argv)
    module, _, batches, _ = b3.build_parts(args)
    counter = FlopCounterMode(display=False)

    class Count(L.Callback):  # the second step only: the first builds caches and the bank
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1:
                counter.__enter__()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1:
                counter.__exit__(None, None, None)

    device = torch.device(args.device)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.precision]
    trainer = L.Trainer(max_steps=2, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Count()], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches[:2], batch_size=None, shuffle=False))
    result = {"flops_per_step": int(counter.get_total_flops()), "preset": args.preset, "batch": args.batch,
              "size": args.size, "precision": args.precision}
    Path(out).write_text(json.dumps(result))
    print(json.dumps(result))
    return result


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"error": f"{path.name}: {err}"}


def combine(folder: str) -> dict[str, Any]:
    """``OUT/gpu_check.json`` from the benchmarks' files in ``folder`` (missing parts say why)."""
    out = Path(folder)
    paper, stage3, flops, restore = (_read(out / n) for n in ("paper/paper_bench.json", "stage3.json",
                                                              "stage3_flops.json", "restore.json"))
    device = stage3.get("device") or next((r.get("gpu") for r in restore.get("rows", []) if r.get("gpu")), None)
    peak = peak_flops(device or "")
    step_s, step_flops = stage3.get("ours_s"), flops.get("flops_per_step")
    stage3_row = {"s_per_step": step_s, "graders_share": stage3.get("iqa_share"),
                  "peak_mem_gib": stage3.get("peak_mem_gib"), "tflops_per_s": None, "mfu": None}
    if step_s and step_flops:
        stage3_row["tflops_per_s"] = round(step_flops / step_s / 1e12, 2)
        stage3_row["mfu"] = round(step_flops / step_s / peak, 4) if peak else None
    restore_rows = []
    for r in restore.get("rows", []):
        achieved = r.get("tflops_per_s")
        restore_rows.append({k: r.get(k) for k in ("megapixels", "tile", "restore_s", "mp_per_s", "cuda_peak_mib",
                                                   "peak_rss_mib", "tflops_per_s")}
                            | {"mfu": round(achieved * 1e12 / peak, 4) if achieved and peak else None})
    result = {"device": device, "peak_bf16_flops": peak,
              "paper_stages": paper.get("rows", paper), "stage3_step": stage3_row | {"error": stage3.get("error")},
              "restore": restore_rows or restore}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


def main(argv: list[str]) -> int:
    if argv[:1] == ["stage3-flops"] and len(argv) >= 2:
        rest = argv[2:]
        stage3_flops(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    if argv[:1] == ["combine"] and len(argv) == 2:
        combine(argv[1])
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
