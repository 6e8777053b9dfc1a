"""Stage 3 with DDP on the CPU: 2 processes (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_stage3_ddp_two_processes_identical_teachers_and_union_bank(demo_root, tmp_path):
    script = Path(__file__).with_name("ddp_stage3_run.py")
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "MASTER_ADDR": "127.0.0.1"}
    run = subprocess.run([sys.executable, str(script), str(demo_root), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    t0 = torch.load(tmp_path / "teacher_rank0.pt")
    t1 = torch.load(tmp_path / "teacher_rank1.pt")
    assert t0.keys() == t1.keys()
    assert all(torch.equal(t0[k], t1[k]) for k in t0)
    ids0 = set(torch.load(tmp_path / "bank_ids_rank0.pt"))
    ids1 = set(torch.load(tmp_path / "bank_ids_rank1.pt"))
    assert ids0 and ids1 and ids0 != ids1           # each rank graded its own share of the images
    ckpt = torch.load(tmp_path / "final.ckpt", map_location="cpu", weights_only=False)
    saved = set(ckpt["pseudo_label_bank"]["entries"])
    unlabeled = {p.stem for p in (demo_root / "dehaze" / "unlabeled").glob("*.png")}
    assert saved == ids0 | ids1 == unlabeled
