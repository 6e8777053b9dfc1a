"""Benchmark: how long the app takes to answer "Restore" on a photo (what its button calls).

    python pipelines/benchmark_app.py                                  # demo checkpoint, 1 MP, 3 answers
    python pipelines/benchmark_app.py --checkpoint OUT/stage3/final.ckpt --megapixels 0.25 1 4

Loads the model and the IQA ensemble the way ``qualiteacher app`` does (stage-3 checkpoint, the
model's task and preset), writes a synthetic 4:3 photo of each size as PNG, and times
``Handlers.restore`` on it: reading the upload, restoring at level 7 with the app's defaults (tiles
and memory budget), scoring input and output, converting for the page. The first answer is a warm-up
(the tile planner's memory probe); the table reports the median of the others and the restore /
scoring split the page's status line gives. Prints a Markdown table and one JSON line
``{"benchmark": "app", ...}``. No browser and no server: Gradio adds its own transfer on top.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_restore import DEMO_CHECKPOINT, machine, photo_size, write_photo  # noqa: E402


def answer_times(checkpoint: str, sizes: list[float], repeats: int) -> list[dict]:
    import torch

    from qualiteacher.app.model import load_checkpoint_model
    from qualiteacher.app.ui import Handlers
    from qualiteacher.iqa.presets import build_ensemble

    torch.manual_seed(0)
    model = load_checkpoint_model(checkpoint)
    ensemble = build_ensemble(model.iqa_preset, task=model.task, weights_dir=model.iqa_weights_dir)
    handlers = Handlers(model, ensemble)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mp in sizes:
            h, w = photo_size(mp)
            photo = str(write_photo(Path(tmp) / f"photo_{mp}.png", h, w))
            walls, restores, scorings = [], [], []
            for i in range(repeats + 1):
                start = time.perf_counter()
                pair, _, status = handlers.restore(photo, 7, None, False)
                wall = time.perf_counter() - start
                if pair is None:
                    raise SystemExit(f"the app refused the {mp}-MP photo: {status}")
                if i:  # the first answer probes the tile memory: a warm-up
                    walls.append(wall)
                    found = re.search(r"restored in ([\d.]+) s, scored in ([\d.]+) s", status)
                    restores.append(float(found.group(1)))
                    scorings.append(float(found.group(2)))
            rows.append({"megapixels": round(h * w / 1e6, 2), "height": h, "width": w,
                         "answer_s": round(statistics.median(walls), 2), "restore_s": round(statistics.median(restores), 2),
                         "score_s": round(statistics.median(scorings), 2), "answers": len(walls),
                         "threads": torch.get_num_threads()})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    p.add_argument("--megapixels", type=float, nargs="+", default=[1.0])
    p.add_argument("--repeats", type=int, default=3, help="timed answers per size (after one warm-up)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        print(f"error: no checkpoint at {args.checkpoint} (run ./qt demo, or pass --checkpoint)", file=sys.stderr)
        return 2
    rows = answer_times(args.checkpoint, args.megapixels, max(1, args.repeats))
    print("| MP | size | answer (s) | restore (s) | scoring (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['megapixels']} | {r['width']}x{r['height']} | {r['answer_s']} | {r['restore_s']} | {r['score_s']} |")
    print(json.dumps({"benchmark": "app", "machine": machine(), "checkpoint": args.checkpoint, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
