"""Every training stage under DDP through the pipeline's own code: 2 gloo processes on the CPU.

The pipeline command is started once (rank 0); Lightning's launcher re-runs it as rank 1 at the
first DDP fit. Rank 1 trains every stage alongside rank 0 and nothing else; rank 0 saves the final
checkpoints, evaluates and registers.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def _ddp(stages, steps=3):
    return [f"--{s}.trainer.{k}" for s in stages
            for k in ("accelerator=cpu", "devices=2", "strategy=ddp", f"max_steps={steps}")]


def _run(tmp_path, demo_root, *args):
    cmd = [sys.executable, "-m", "qualiteacher.cli", "pipeline", "dehaze", "--preset", "tiny",
           f"--data_root={demo_root}", f"--out_dir={tmp_path / 'out'}", "--checkpoint_every=2", *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and "RANK" not in k}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    return run.stdout + run.stderr


def test_pipeline_runs_every_iqpir_stage_on_two_processes(demo_root, tmp_path):
    from mlflow import MlflowClient

    stages = ("stage1", "stage2", "fidelity", "stage3")
    # stage 1's GAN starts at its second step: both backward passes (generator, discriminator) run
    log = _run(tmp_path, demo_root, *_ddp(stages), "--stage1.model.gan_start_step=1")
    out = tmp_path / "out"
    for stage in stages:
        assert f"[rank 1] {stage}: trained alongside rank 0" in log, stage
        assert (out / stage / "final.ckpt").is_file()
    state = json.loads((out / "state.json").read_text())
    assert all(state["stages"][s]["done"] for s in ("data", *stages, "eval", "register"))
    final = torch.load(out / "stage3" / "final.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 3
    # both ranks' random streams are checkpointed, and they differ (per-rank seeds)
    gens = final["qualiteacher_rng"]["generator"]
    assert len(gens) == 2 and not torch.equal(gens[0], gens[1])
    # the merged bank index refers to files in the bank folder written by the ranks
    keys = {e[2] for entries in final["pseudo_label_bank"]["entries"].values() for e in entries}
    files = {p.stem for p in (out / "stage3" / "bank").glob("??/*.npy")}
    assert keys and keys <= files
    assert "blobs" not in final["pseudo_label_bank"]
    # rank 0 alone tracked, evaluated and registered
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qualiteacher").experiment_id])
    assert sorted(r.data.tags.get("stage", "parent") for r in runs) == sorted(
        ["parent", "data", *stages, "eval", "register"])
    assert len(client.search_model_versions("name = 'qualiteacher-dehaze'")) == 1
    assert (out / "eval").is_dir()


def test_unet_warmup_on_two_processes_keeps_the_conditioning_for_stage3(demo_root, tmp_path):
    log = _run(tmp_path, demo_root, "--student=unet", "--only-stage", "stage2", *_ddp(["stage2"]))
    assert "[rank 1] stage2: trained alongside rank 0" in log
    ckpt = torch.load(tmp_path / "out" / "stage2" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    emb = ckpt["state_dict"]["student.level_embedding.embedding.weight"]
    assert torch.count_nonzero(emb) == 0  # frozen until stage 3, still its zero initialisation
