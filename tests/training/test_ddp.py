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
    saved = ckpt["pseudo_label_bank"]["entries"]
    unlabeled = {p.stem for p in (demo_root / "dehaze" / "unlabeled").glob("*.png")}
    assert set(saved) == ids0 | ids1 == unlabeled
    keys = {e[2] for entries in saved.values() for e in entries}
    assert keys <= {p.stem for p in (tmp_path / "bank").glob("??/*.npy")}  # no pixels moved, none lost


def test_launch_rank_reads_every_launcher_and_rank_seeds_differ(monkeypatch):
    from qualiteacher.training.distributed import launch_rank, rank_seed

    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launch_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")          # Lightning's launcher on the second node
    assert launch_rank() == 1
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert launch_rank() == 5
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, r) for r in range(64)}
    assert len(seeds) == 64
    a, b = (torch.Generator().manual_seed(rank_seed(7, r)) for r in (0, 1))
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_conditioning_is_frozen_before_stage3_and_trains_in_stage3():
    from qualiteacher.training.distributed import set_conditioning_trainable_
    from qualiteacher.training.students import build_student
    from qualiteacher.training.warmup import WarmupModule

    for cond_mode in ("add", "adaln"):
        net = build_student("iqpir", "tiny", cond_mode)
        assert set_conditioning_trainable_(net, False) > 0
        frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
        assert frozen and all("conditioning" in n or ".ada." in n or "level_embedding" in n for n in frozen)
    warm = WarmupModule(student="unet", preset="tiny")
    assert not warm.student.level_embedding.embedding.weight.requires_grad
    assert all(p.requires_grad for n, p in warm.student.named_parameters() if "level_embedding" not in n)
