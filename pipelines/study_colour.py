"""Where does the colour go? Each candidate cause of the student's colour loss, measured on a
pipeline's checkpoints and the held-out test split (not a test: a study, minutes on a CPU).

    python pipelines/study_colour.py --out outputs/dehaze --data demo_data --task dehaze

Rows (PSNR / SSIM / opponent-colour correlation / ΔE76 against the ground truth, and the chroma
of the output relative to the ground truth's):
- the input, and the task's classical restorer (no training);
- the codebook prior's palette: the stage-1 autoencoder reconstructing the *clean* test photos,
  and its code usage (perplexity) there;
- the warm-up at w = 0 (pure prior), 0.5, 1, with AdaIN on and off (the fidelity path);
- the warm-up's image-level fusion alone: its locally affine correction of the input and its gate;
- the EMA teacher and the student at levels 0, 4 and the top one (what stage 3 and its reward did);
- the student given the clean ground truth (do no harm).
Airlight colour of the synthetic haze (source grey vs real tinted) is read from the manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from qualiteacher.archs.presets import build_autoencoder
from qualiteacher.archs.quantize import perplexity_of
from qualiteacher.classical import classical_restorer
from qualiteacher.data.io import read_image, to_tensor
from qualiteacher.eval.colour import delta_e, opponent_channels, opponent_correlation
from qualiteacher.eval.fullref import psnr, ssim
from qualiteacher.training.stage3 import load_trained
from qualiteacher.training.students import build_student, load_student_weights, read_checkpoint_state


def _load(folder: Path) -> Tensor:
    return torch.stack([to_tensor(read_image(p)) for p in sorted(folder.glob("*.png"))])


def _row(name: str, out: Tensor, gt: Tensor, **extra: float) -> dict:
    out = out.clamp(0, 1)
    chroma = opponent_channels(out).flatten(2).std(-1).mean() / opponent_channels(gt).flatten(2).std(-1).mean()
    return {"restorer": name, "psnr": float(psnr(out, gt).mean()), "ssim": float(ssim(out, gt).mean()),
            "colour_corr": float(opponent_correlation(out, gt).mean()), "delta_e": float(delta_e(out, gt).mean()),
            "chroma_ratio": float(chroma), **extra}


def _airlight(data: Path, task: str) -> str:
    manifest = data / "manifest.csv"
    if task != "dehaze" or not manifest.is_file():
        return ""
    df = pd.read_csv(manifest)
    df = df[df["task"] == "dehaze"]
    parts = []
    for split in ("labeled", "test"):
        rows = df[df["split"] == split]
        tint = (rows["tint_r"] - rows["tint_b"]).abs()
        parts.append(f"{split}: airlight {rows['airlight'].mean():.2f}, |tint R-B| {tint.mean():.3f}")
    return "; ".join(parts)


@torch.no_grad()
def study(out_dir: Path, data: Path, task: str, split: str = "test") -> pd.DataFrame:
    lq, gt = _load(data / task / split / "lq"), _load(data / task / split / "gt")
    module = load_trained(out_dir / "stage3" / "final.ckpt")
    hp = module.hparams
    rows = [_row("input", lq, gt), _row("classical", classical_restorer(task)(lq), gt)]

    state = read_checkpoint_state(out_dir / "stage1" / "final.ckpt")
    ae = build_autoencoder(hp.preset)
    ae.load_state_dict({k.removeprefix("autoencoder."): v for k, v in state.items() if k.startswith("autoencoder.")})
    ae.eval()
    rec = ae(gt)
    rows.append(_row("stage-1 autoencoder (clean in)", rec.image, gt,
                     perplexity=float(perplexity_of(rec.quant.indices_common, ae.codebook.common.num_codes))))

    warm = build_student("iqpir", hp.preset, hp.cond_mode).eval()
    load_student_weights(warm, hp.init_from or out_dir / "fidelity" / "final.ckpt")
    for w in (0.0, 0.5, 1.0):
        rows.append(_row(f"warm-up w={w}", warm(lq, None, w=w).image, gt))
    if warm.fidelity is not None:
        warm.fidelity.adain = not warm.fidelity.adain
        rows.append(_row(f"warm-up w=1, AdaIN {'on' if warm.fidelity.adain else 'off'}", warm(lq, None, w=1.0).image, gt))
        warm.fidelity.adain = not warm.fidelity.adain
        image = warm.fidelity.image
        if image is not None:  # the image-level fusion's correction alone, and how much the blend takes of it
            seen: dict = {}
            hook = image.register_forward_hook(lambda m, a, r: seen.update(res=r))
            warm(lq, None, w=1.0)
            hook.remove()
            rows.append(_row("warm-up: affine correction alone", seen["res"].corrected, gt,
                             gate=float(seen["res"].gate.mean())))
    rows.append(_row("warm-up (clean in)", warm(gt, None, w=1.0).image, gt))
    top = int(hp.top_level)
    rows.append(_row("teacher", module.teacher(lq, None).image, gt))
    for q in (0, 4, top):
        rows.append(_row(f"student@{q}", module.student(lq, torch.full((len(lq),), q)).image, gt))
    rows.append(_row(f"student@{top} (clean in)", module.student(gt, torch.full((len(gt),), top)).image, gt))
    return pd.DataFrame(rows).set_index("restorer")


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| restorer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.iterrows():
        cells = ["" if pd.isna(v) else f"{v:.2f}" if c in ("psnr", "delta_e", "perplexity") else f"{v:.3f}"
                 for c, v in row.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/dehaze"), help="the pipeline's output folder")
    parser.add_argument("--data", type=Path, default=Path("demo_data"))
    parser.add_argument("--task", default="dehaze")
    parser.add_argument("--split", default="test", help="test, or val to choose settings")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    table = study(args.out, args.data, args.task, args.split)
    print(_markdown(table))
    note = _airlight(args.data, args.task)
    if note:
        print(f"\nsynthetic haze: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
